-- Durable jobs (videos): a row per job, created in the same transaction as its hold; a terminal state commits in
-- the same transaction as the hold's capture or release. States (internal): pending → submitting → queued ⇄
-- running → finalizing → succeeded, or failed / canceled / unknown. Pollers claim due jobs with a lease and apply
-- results with a compare-and-set on lease_epoch, which fences out a stale poller.
CREATE TABLE jobs (
  id TEXT PRIMARY KEY,
  object TEXT NOT NULL CHECK (object IN ('video', 'job')),
  key_id INTEGER NOT NULL REFERENCES api_keys(id),
  account_id INTEGER NOT NULL REFERENCES accounts(id),
  model TEXT NOT NULL,
  hold_id TEXT NOT NULL UNIQUE REFERENCES holds(id),
  request TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('pending', 'submitting', 'queued', 'running', 'finalizing', 'unknown',
                                       'succeeded', 'failed', 'canceled')),
  backend TEXT,
  handle TEXT,
  progress INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
  queue_position INTEGER,
  lease_owner TEXT,
  lease_until INTEGER,
  lease_epoch INTEGER NOT NULL DEFAULT 0,
  next_poll_at INTEGER NOT NULL,
  poll_failures INTEGER NOT NULL DEFAULT 0,
  deadline_at INTEGER NOT NULL,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  error_code TEXT,
  error_message TEXT,
  outputs TEXT,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  completed_at INTEGER
) STRICT;
CREATE INDEX jobs_due ON jobs(next_poll_at) WHERE state NOT IN ('succeeded', 'failed', 'canceled');
CREATE INDEX jobs_owner ON jobs(key_id, created_at);

ALTER TABLE idempotency_records ADD COLUMN job_id TEXT REFERENCES jobs(id);
