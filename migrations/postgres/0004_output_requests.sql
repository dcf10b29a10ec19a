-- The gallery: see migrations/sqlite/0007_output_requests.sql. Outputs made without keys are recorded with key_id NULL.
ALTER TABLE outputs
  ALTER COLUMN key_id DROP NOT NULL,
  ADD COLUMN model TEXT,
  ADD COLUMN kind TEXT,
  ADD COLUMN mime TEXT,
  ADD COLUMN bytes BIGINT,
  ADD COLUMN request TEXT,
  ADD COLUMN poster TEXT;
CREATE INDEX outputs_by_key ON outputs(key_id, created_at DESC, id DESC);
CREATE INDEX outputs_by_time ON outputs(created_at DESC, id DESC);
