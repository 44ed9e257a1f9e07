-- Accounts, API keys and the credits ledger. Times are Unix milliseconds.
CREATE TABLE accounts (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    plan            TEXT NOT NULL,
    credits         BIGINT NOT NULL DEFAULT 0 CHECK (credits >= 0),
    webhook_url     TEXT,
    webhook_secret  TEXT,
    created_at      BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts(id),
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL UNIQUE,
    key_hash      TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT,
    revoked_at    BIGINT,
    replaced_by   TEXT
);
CREATE INDEX api_keys_account ON api_keys(account_id, created_at);

CREATE TABLE ledger (
    id               TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    delta            BIGINT NOT NULL,
    reason           TEXT NOT NULL,
    reference        TEXT,
    idempotency_key  TEXT NOT NULL,
    refund_of        TEXT,
    created_at       BIGINT NOT NULL,
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX ledger_account_time ON ledger(account_id, created_at);
