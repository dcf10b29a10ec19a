-- Client webhooks: a job may name a URL to tell when it ends. The terminal transaction that ends the job writes
-- its event into webhook_outbox, so a crash can neither lose nor duplicate it; a deliverer leases due rows
-- (lease_owner/lease_until, like jobs), POSTs them signed, and records delivery or the next attempt.
ALTER TABLE jobs ADD COLUMN webhook_url TEXT;

CREATE TABLE webhook_outbox (
  id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL,
  url TEXT NOT NULL,
  payload TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL,
  lease_owner TEXT,
  lease_until INTEGER,
  delivered_at INTEGER,
  gave_up_at INTEGER,
  last_error TEXT,
  created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX webhook_outbox_due ON webhook_outbox(next_attempt_at) WHERE delivered_at IS NULL AND gave_up_at IS NULL;
CREATE UNIQUE INDEX webhook_outbox_job ON webhook_outbox(job_id);
