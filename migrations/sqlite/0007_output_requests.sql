-- The gallery: each stored output also records what made it (model, kind, MIME type, size, the request as JSON,
-- a video's poster image), and outputs made without keys are recorded too (key_id NULL). SQLite cannot drop a
-- NOT NULL constraint in place, so the table is rebuilt; nothing references it.
CREATE TABLE outputs_v2 (
  id TEXT PRIMARY KEY,
  key_id INTEGER REFERENCES api_keys(id),
  hold_id TEXT REFERENCES holds(id),
  created_at INTEGER NOT NULL,
  model TEXT,
  kind TEXT,
  mime TEXT,
  bytes INTEGER,
  request TEXT,
  poster TEXT
) STRICT;
INSERT INTO outputs_v2 (id, key_id, hold_id, created_at) SELECT id, key_id, hold_id, created_at FROM outputs;
DROP TABLE outputs;
ALTER TABLE outputs_v2 RENAME TO outputs;
-- Listing newest first, per key or over all.
CREATE INDEX outputs_by_key ON outputs(key_id, created_at DESC, id DESC);
CREATE INDEX outputs_by_time ON outputs(created_at DESC, id DESC);
