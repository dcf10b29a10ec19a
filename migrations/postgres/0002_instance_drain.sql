-- When an instance began draining (SIGTERM), for the fleet's view in /v1/gateway/status; NULL while it serves.
ALTER TABLE instances ADD COLUMN draining_since BIGINT;
