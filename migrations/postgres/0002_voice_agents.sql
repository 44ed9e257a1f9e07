-- Voice agents, their calls, and webhook deliveries. Times are Unix ms.
-- `calls_lock` on accounts is the row every outbound-call admission
-- updates first, so admissions of one account run one at a time (a row lock
-- on PostgreSQL, the write lock on SQLite) and the hourly quota is exact.
ALTER TABLE accounts ADD COLUMN calls_lock BIGINT NOT NULL DEFAULT 0;

CREATE TABLE agents (
    id                 TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL REFERENCES accounts(id),
    name               TEXT NOT NULL,
    system_prompt      TEXT NOT NULL,
    greeting           TEXT NOT NULL,
    tts_model          TEXT NOT NULL,
    llm_model          TEXT NOT NULL,
    voice              TEXT,
    language           TEXT NOT NULL,
    max_duration_secs  BIGINT,
    end_call_phrases   TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    deleted_at         BIGINT
);
CREATE INDEX agents_account ON agents(account_id, created_at);

CREATE TABLE calls (
    id               TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    agent_id         TEXT NOT NULL REFERENCES agents(id),
    direction        TEXT NOT NULL,
    to_number        TEXT NOT NULL,
    from_number      TEXT,
    trunk            TEXT,
    status           TEXT NOT NULL,
    end_reason       TEXT,
    sip_code         BIGINT,
    sip_reason       TEXT,
    sip_call_id      TEXT,
    metadata         TEXT,
    node_id          TEXT NOT NULL,
    idempotency_key  TEXT,
    created_at       BIGINT NOT NULL,
    ringing_at       BIGINT,
    answered_at      BIGINT,
    ended_at         BIGINT,
    billed_minutes   BIGINT NOT NULL DEFAULT 0,
    credits_charged  BIGINT NOT NULL DEFAULT 0,
    transcript       TEXT,
    latency          TEXT,
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX calls_account_created ON calls(account_id, created_at, id);
CREATE INDEX calls_node_open ON calls(node_id, ended_at);
-- Call minutes are found by the call they belong to.
CREATE INDEX ledger_reference ON ledger(reference);

CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    event            TEXT NOT NULL,
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    last_status      BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    delivered_at     BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(status, next_attempt_at);
