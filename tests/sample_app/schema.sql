-- The sample project's own tables and its queues (run once, like any migration of the project).
CREATE SCHEMA IF NOT EXISTS sample;
CREATE TABLE IF NOT EXISTS sample.sources (
    id          bigint PRIMARY KEY,
    url         text NOT NULL,
    status      text NOT NULL DEFAULT 'new',
    body        text,
    words       integer
);
CREATE TABLE IF NOT EXISTS sample.notifications (
    source_id   bigint NOT NULL REFERENCES sample.sources,
    message     text NOT NULL
);
INSERT INTO dispatch.queues (name) VALUES ('source_download'), ('source_extract'), ('source_notify')
ON CONFLICT (name) DO NOTHING;
CREATE TABLE IF NOT EXISTS sample.ticks (
    tick  timestamptz NOT NULL,
    pid   integer NOT NULL,
    args  text NOT NULL
);
