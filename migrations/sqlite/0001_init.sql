-- Times are UTC milliseconds since the Unix epoch.
CREATE TABLE sessions (
    user_id        TEXT PRIMARY KEY,
    container_id   TEXT,
    container_name TEXT,
    state          TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    started_at     BIGINT,
    last_activity  BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      TEXT NOT NULL,
    container_id TEXT,
    kind         TEXT NOT NULL,
    reason       TEXT,
    at           BIGINT NOT NULL
);

CREATE INDEX events_user_at ON events (user_id, at);
