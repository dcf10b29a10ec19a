-- Who made each stored output (keys mode): an unsigned GET /v1/files/{id}, or an edit naming it as `file_id`,
-- needs that key. Recorded in the same transaction that captures the answer's hold.
CREATE TABLE outputs (
  id TEXT PRIMARY KEY,
  key_id INTEGER NOT NULL REFERENCES api_keys(id),
  hold_id TEXT REFERENCES holds(id),
  created_at INTEGER NOT NULL
) STRICT;
