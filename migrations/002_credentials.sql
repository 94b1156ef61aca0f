-- Credentials for authentication: access keys of users, secrets stored only as salted hashes.
ALTER TABLE users ADD COLUMN role text NOT NULL DEFAULT 'user';
CREATE UNIQUE INDEX companies_name ON companies (name);
CREATE UNIQUE INDEX users_company_name ON users (company, name);

CREATE TABLE credentials (
    access_key  text        PRIMARY KEY,
    secret_hash text        NOT NULL,  -- scrypt$<n>$<r>$<p>$<salt>$<hash>, base64
    company     text        NOT NULL,
    user_id     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    FOREIGN KEY (company, user_id) REFERENCES users (company, id) ON DELETE CASCADE
);

-- The key that signs tokens when WORKERS_AUTH_SECRET is not set: made once, shared by
-- every server process and host that uses this database.
CREATE TABLE token_signing_key (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    secret text    NOT NULL
);
