-- Generation jobs: a durable queue claimed with a lease, and every attempt
-- of every webhook delivery. Times are Unix milliseconds.
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL REFERENCES accounts(id),
    kind              TEXT NOT NULL,
    model             TEXT NOT NULL,
    -- 'api' (/api/generate/*) or 'v1' (/v1 task routes): how the job is shown.
    source            TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('queued', 'processing', 'completed', 'failed')),
    input             TEXT NOT NULL,
    cost              BIGINT NOT NULL CHECK (cost > 0),
    progress          BIGINT NOT NULL DEFAULT 0,
    output_key        TEXT,
    output_type       TEXT,
    metadata          TEXT,
    error             TEXT,
    credits_refunded  BIGINT NOT NULL DEFAULT 0,
    attempts          BIGINT NOT NULL DEFAULT 0,
    max_attempts      BIGINT NOT NULL,
    run_after         BIGINT NOT NULL,
    locked_by         TEXT,
    locked_until      BIGINT,
    -- The upstream task of a submit-and-poll channel, so a job picked up
    -- again after a crash polls it instead of paying for a second one.
    upstream          TEXT,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT
);
CREATE INDEX jobs_account_created ON jobs(account_id, created_at);
CREATE INDEX jobs_due ON jobs(status, run_after);
CREATE INDEX jobs_leases ON jobs(status, locked_until);

CREATE TABLE webhook_attempts (
    delivery_id  TEXT NOT NULL REFERENCES webhook_deliveries(id),
    attempt      BIGINT NOT NULL,
    at           BIGINT NOT NULL,
    status       BIGINT,
    error        TEXT,
    duration_ms  BIGINT NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE INDEX webhook_deliveries_account ON webhook_deliveries(account_id, created_at);
