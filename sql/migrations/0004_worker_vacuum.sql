-- 0004: let workers vacuum the jobs table where the server allows it.
-- Workers VACUUM dispatch.jobs between autovacuum runs (Engine.vacuum_jobs). PostgreSQL 17+
-- has a MAINTAIN privilege for it; before 17 only the owner may, and workers connected as
-- dispatch_worker leave it to autovacuum.
DO $$
BEGIN
    IF current_setting('server_version_num')::integer >= 170000 THEN
        EXECUTE 'GRANT MAINTAIN ON dispatch.jobs TO dispatch_worker';
    END IF;
END $$;
