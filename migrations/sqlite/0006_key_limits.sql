-- A key's own limits, overriding `auth.key_limits`: NULL = the configured default, 0 = unlimited, N = at most N
-- requests a minute / N requests in flight.
ALTER TABLE api_keys ADD COLUMN requests_per_minute INTEGER CHECK (requests_per_minute >= 0);
ALTER TABLE api_keys ADD COLUMN max_parallel INTEGER CHECK (max_parallel >= 0);
