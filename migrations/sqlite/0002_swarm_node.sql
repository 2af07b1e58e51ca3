-- Swarm mode: the swarm node ID that holds the user's workspace volume (NULL on one host).
ALTER TABLE sessions ADD COLUMN node TEXT;
