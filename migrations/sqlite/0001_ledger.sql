-- API keys, credit accounts, prices, holds and the append-only journal.
-- Amounts are integer millicredits (1 credit = 1000 mc); times are unix milliseconds.

CREATE TABLE accounts (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  available_mc INTEGER NOT NULL DEFAULT 0 CHECK (available_mc >= 0),
  held_mc INTEGER NOT NULL DEFAULT 0 CHECK (held_mc >= 0),
  granted_mc INTEGER NOT NULL DEFAULT 0,
  captured_mc INTEGER NOT NULL DEFAULT 0,
  updated_at INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
  id INTEGER PRIMARY KEY,
  account_id INTEGER NOT NULL REFERENCES accounts(id),
  name TEXT NOT NULL UNIQUE,
  prefix TEXT NOT NULL,
  secret_sha256 BLOB NOT NULL UNIQUE,
  allowed_models TEXT,                -- comma-separated; NULL = every model
  created_at INTEGER NOT NULL,
  revoked_at INTEGER
) STRICT;

CREATE TABLE model_prices (
  id INTEGER PRIMARY KEY,
  model TEXT NOT NULL,
  unit TEXT NOT NULL CHECK (unit IN ('image', 'second', 'request')),
  price_mc INTEGER NOT NULL CHECK (price_mc >= 0),
  effective_from INTEGER NOT NULL,
  UNIQUE (model, unit, price_mc)
) STRICT;

CREATE TABLE holds (
  id TEXT PRIMARY KEY,
  account_id INTEGER NOT NULL REFERENCES accounts(id),
  key_id INTEGER NOT NULL REFERENCES api_keys(id),
  price_id INTEGER NOT NULL REFERENCES model_prices(id),
  units INTEGER NOT NULL CHECK (units > 0),
  amount_mc INTEGER NOT NULL CHECK (amount_mc >= 0),
  state TEXT NOT NULL CHECK (state IN ('held', 'captured', 'released')),
  captured_units INTEGER,
  captured_mc INTEGER CHECK (captured_mc BETWEEN 0 AND amount_mc),
  kind TEXT NOT NULL CHECK (kind IN ('sync', 'job')),
  lease_until INTEGER,
  created_at INTEGER NOT NULL,
  resolved_at INTEGER,
  reason TEXT
) STRICT;
CREATE INDEX holds_open ON holds(lease_until) WHERE state = 'held';
CREATE INDEX holds_key_time ON holds(key_id, created_at);

CREATE TABLE ledger_entries (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  account_id INTEGER NOT NULL REFERENCES accounts(id),
  hold_id TEXT REFERENCES holds(id),
  kind TEXT NOT NULL CHECK (kind IN ('grant', 'adjust', 'hold', 'capture', 'release')),
  available_delta_mc INTEGER NOT NULL,
  held_delta_mc INTEGER NOT NULL,
  available_after_mc INTEGER NOT NULL,
  held_after_mc INTEGER NOT NULL,
  actor TEXT NOT NULL,
  memo TEXT,
  created_at INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX entry_open ON ledger_entries(hold_id) WHERE kind = 'hold';
CREATE UNIQUE INDEX entry_close ON ledger_entries(hold_id) WHERE kind IN ('capture', 'release');

CREATE TABLE idempotency_records (
  key_id INTEGER NOT NULL REFERENCES api_keys(id),
  idem_key TEXT NOT NULL CHECK (length(idem_key) BETWEEN 1 AND 255),
  method TEXT NOT NULL,
  path TEXT NOT NULL,
  fingerprint BLOB NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
  lease_until INTEGER,
  hold_id TEXT REFERENCES holds(id),
  status_code INTEGER,
  content_type TEXT,
  response_body BLOB,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  PRIMARY KEY (key_id, idem_key)
) STRICT;
