-- The PostgreSQL ledger: the same tables, columns and invariants as migrations/sqlite (after all of its steps),
-- with BIGINT amounts and times (integer millicredits, unix milliseconds), BYTEA for hashes and bodies, JSONB for
-- a job's request, handle and outputs, and a table of live instances: several easel processes share one database,
-- each heartbeats its row, and only the holds of an instance whose lease lapsed are released by the others.

CREATE TABLE instances (
  id TEXT PRIMARY KEY,
  started_at BIGINT NOT NULL,
  lease_until BIGINT NOT NULL
);

CREATE TABLE accounts (
  id BIGSERIAL PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  available_mc BIGINT NOT NULL DEFAULT 0 CHECK (available_mc >= 0),
  held_mc BIGINT NOT NULL DEFAULT 0 CHECK (held_mc >= 0),
  granted_mc BIGINT NOT NULL DEFAULT 0,
  captured_mc BIGINT NOT NULL DEFAULT 0,
  updated_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
  id BIGSERIAL PRIMARY KEY,
  account_id BIGINT NOT NULL REFERENCES accounts(id),
  name TEXT NOT NULL UNIQUE,
  prefix TEXT NOT NULL,
  secret_sha256 BYTEA NOT NULL UNIQUE,
  allowed_models TEXT,                -- comma-separated; NULL = every model
  created_at BIGINT NOT NULL,
  revoked_at BIGINT
);

CREATE TABLE model_prices (
  id BIGSERIAL PRIMARY KEY,
  model TEXT NOT NULL,
  unit TEXT NOT NULL CHECK (unit IN ('image', 'second', 'request', '1k_tokens')),
  price_mc BIGINT NOT NULL CHECK (price_mc >= 0),
  output_price_mc BIGINT NOT NULL DEFAULT 0 CHECK (output_price_mc >= 0 AND (output_price_mc = 0 OR unit = '1k_tokens')),
  effective_from BIGINT NOT NULL,
  UNIQUE (model, unit, price_mc, output_price_mc)
);

CREATE TABLE holds (
  id TEXT PRIMARY KEY,
  account_id BIGINT NOT NULL REFERENCES accounts(id),
  key_id BIGINT NOT NULL REFERENCES api_keys(id),
  price_id BIGINT NOT NULL REFERENCES model_prices(id),
  units BIGINT NOT NULL CHECK (units > 0),
  amount_mc BIGINT NOT NULL CHECK (amount_mc >= 0),
  state TEXT NOT NULL CHECK (state IN ('held', 'captured', 'released')),
  captured_units BIGINT,
  captured_mc BIGINT CHECK (captured_mc BETWEEN 0 AND amount_mc),
  kind TEXT NOT NULL CHECK (kind IN ('sync', 'job')),
  lease_until BIGINT,
  instance_id TEXT,                   -- the process that placed it (sync holds die with it)
  created_at BIGINT NOT NULL,
  resolved_at BIGINT,
  reason TEXT
);
CREATE INDEX holds_open ON holds(lease_until) WHERE state = 'held';
CREATE INDEX holds_open_instance ON holds(instance_id) WHERE state = 'held';
CREATE INDEX holds_key_time ON holds(key_id, created_at);

CREATE TABLE ledger_entries (
  seq BIGSERIAL PRIMARY KEY,
  account_id BIGINT NOT NULL REFERENCES accounts(id),
  hold_id TEXT REFERENCES holds(id),
  kind TEXT NOT NULL CHECK (kind IN ('grant', 'adjust', 'hold', 'capture', 'release')),
  available_delta_mc BIGINT NOT NULL,
  held_delta_mc BIGINT NOT NULL,
  available_after_mc BIGINT NOT NULL,
  held_after_mc BIGINT NOT NULL,
  actor TEXT NOT NULL,
  memo TEXT,
  created_at BIGINT NOT NULL
);
CREATE INDEX ledger_entries_account ON ledger_entries(account_id);
CREATE UNIQUE INDEX entry_open ON ledger_entries(hold_id) WHERE kind = 'hold';
CREATE UNIQUE INDEX entry_close ON ledger_entries(hold_id) WHERE kind IN ('capture', 'release');

-- Who made each stored output (keys mode), recorded in the transaction that captures the answer's hold.
CREATE TABLE outputs (
  id TEXT PRIMARY KEY,
  key_id BIGINT NOT NULL REFERENCES api_keys(id),
  hold_id TEXT REFERENCES holds(id),
  created_at BIGINT NOT NULL
);

-- Durable jobs; see migrations/sqlite/0003_jobs.sql for the states and the lease-epoch fencing.
CREATE TABLE jobs (
  id TEXT PRIMARY KEY,
  object TEXT NOT NULL CHECK (object IN ('video', 'job')),
  key_id BIGINT NOT NULL REFERENCES api_keys(id),
  account_id BIGINT NOT NULL REFERENCES accounts(id),
  model TEXT NOT NULL,
  hold_id TEXT NOT NULL UNIQUE REFERENCES holds(id),
  request JSONB NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('pending', 'submitting', 'queued', 'running', 'finalizing', 'unknown',
                                       'succeeded', 'failed', 'canceled')),
  backend TEXT,
  handle JSONB,
  progress BIGINT NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
  queue_position BIGINT,
  lease_owner TEXT,
  lease_until BIGINT,
  lease_epoch BIGINT NOT NULL DEFAULT 0,
  next_poll_at BIGINT NOT NULL,
  poll_failures BIGINT NOT NULL DEFAULT 0,
  deadline_at BIGINT NOT NULL,
  cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
  error_code TEXT,
  error_message TEXT,
  outputs JSONB,
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL,
  completed_at BIGINT,
  webhook_url TEXT
);
CREATE INDEX jobs_due ON jobs(next_poll_at) WHERE state NOT IN ('succeeded', 'failed', 'canceled');
CREATE INDEX jobs_owner ON jobs(key_id, created_at);

CREATE TABLE idempotency_records (
  key_id BIGINT NOT NULL REFERENCES api_keys(id),
  idem_key TEXT NOT NULL CHECK (length(idem_key) BETWEEN 1 AND 255),
  method TEXT NOT NULL,
  path TEXT NOT NULL,
  fingerprint BYTEA NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
  lease_until BIGINT,
  hold_id TEXT REFERENCES holds(id),
  job_id TEXT REFERENCES jobs(id),
  instance_id TEXT,                   -- the process running the request while in_progress
  status_code BIGINT,
  content_type TEXT,
  response_body BYTEA,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  PRIMARY KEY (key_id, idem_key)
);

-- Client webhooks: written by the transaction that ends the job, leased by a deliverer.
CREATE TABLE webhook_outbox (
  id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL,
  url TEXT NOT NULL,
  payload TEXT NOT NULL,
  attempts BIGINT NOT NULL DEFAULT 0,
  next_attempt_at BIGINT NOT NULL,
  lease_owner TEXT,
  lease_until BIGINT,
  delivered_at BIGINT,
  gave_up_at BIGINT,
  last_error TEXT,
  created_at BIGINT NOT NULL
);
CREATE INDEX webhook_outbox_due ON webhook_outbox(next_attempt_at) WHERE delivered_at IS NULL AND gave_up_at IS NULL;
CREATE UNIQUE INDEX webhook_outbox_job ON webhook_outbox(job_id);
