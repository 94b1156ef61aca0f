-- Workers' runtime properties (workers.set_runtime_properties / get_runtime_properties):
-- string values by key, kept per company, the user who set them and worker id, as ClearML's
-- server keys them. expires_at NULL: kept until changed or removed. A row whose expires_at
-- has passed is never read, and the expiry sweep deletes it (the table is small and read
-- whole by the sweep, as worker_registrations is: no index on expires_at).
CREATE TABLE worker_runtime_properties (
    company    text        NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    user_id    text        NOT NULL,
    worker     text        NOT NULL,
    key        text        NOT NULL,
    value      text        NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (company, user_id, worker, key)
);
