-- Several replicas sharing one database (src/sandbox/replicas.rs): a user's slot under the
-- global cap is reserved here (UTC milliseconds) while a replica creates or starts the
-- sandbox, so the other replicas count it before it is running; every save clears it, and a
-- reservation older than the start bound is ignored (its replica died mid-way).
ALTER TABLE sessions ADD COLUMN reserved_at BIGINT;
