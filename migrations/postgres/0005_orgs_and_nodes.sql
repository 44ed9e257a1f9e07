-- Organisations and several processes on one database.
--
-- An account is an organisation: credits, agents, calls, jobs and webhooks
-- belong to it, and its members hold API keys scoped to it (`member` names
-- who holds a key). A key may carry limits of its own: the models it may
-- use, the client addresses it is accepted from (CIDRs) and a daily credit
-- cap. `cap_lock` is written first by a debit of a capped key, so debits of
-- one key are counted one at a time.
ALTER TABLE api_keys ADD COLUMN member TEXT;
ALTER TABLE api_keys ADD COLUMN allowed_models TEXT;
ALTER TABLE api_keys ADD COLUMN ip_allowlist TEXT;
ALTER TABLE api_keys ADD COLUMN daily_credit_cap BIGINT;
ALTER TABLE api_keys ADD COLUMN cap_lock BIGINT NOT NULL DEFAULT 0;

-- The key a debit (and its refund) was made with, for the daily cap.
ALTER TABLE ledger ADD COLUMN key_id TEXT;
CREATE INDEX ledger_key_time ON ledger(key_id, created_at);

-- The key that placed a call: its minutes count against that key's cap.
ALTER TABLE calls ADD COLUMN key_id TEXT;

-- Processes sharing this database. Each refreshes `heartbeat_at`; one that
-- stops refreshing is dead after the configured time: a survivor marks it
-- (`reaped_at`, `reaped_by`), then closes the calls it started before that
-- and requeues its jobs (`settled_at`).
CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    started_at    BIGINT NOT NULL,
    heartbeat_at  BIGINT NOT NULL,
    stopped_at    BIGINT,
    reaped_at     BIGINT,
    reaped_by     TEXT,
    settled_at    BIGINT
);
CREATE INDEX jobs_locked_by ON jobs(locked_by, status);
