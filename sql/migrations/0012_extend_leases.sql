-- 0012: lease extension that never waits. Kept in step with sql/schema.sql.

-- The heartbeat extends the leases of running jobs, outcomes not yet written included, while
-- the outcome writer deletes or updates the same rows in another order: the two statements
-- could deadlock (seen under load: "writing N outcomes failed (DeadlockDetected)"). A row
-- locked now is being finished or rescued: it is skipped, neither extended nor reported lost,
-- and the next heartbeat sees what became of it. extend_leases_v1 stays for older workers.
CREATE FUNCTION dispatch.extend_leases_v2(tokens uuid[], lease interval)
RETURNS TABLE (lost_token uuid)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH held AS (
        SELECT j.id FROM dispatch.jobs j
        WHERE j.lease_token = ANY (tokens) AND j.state = 'running'
        FOR UPDATE SKIP LOCKED
    ), extended AS (
        UPDATE dispatch.jobs j SET lease_expires_at = now() + lease
        FROM held h WHERE j.id = h.id
        RETURNING j.lease_token
    )
    SELECT t FROM unnest(tokens) t
    WHERE t NOT IN (SELECT e.lease_token FROM extended e)
      -- skipped, not lost: the row still holds the lease as this statement sees it
      AND NOT EXISTS (SELECT FROM dispatch.jobs j WHERE j.lease_token = t AND j.state = 'running')
$$;

GRANT EXECUTE ON FUNCTION dispatch.extend_leases_v2(uuid[], interval) TO dispatch_worker;

-- Functions are executable by PUBLIC when created. 0006 revoked that for the functions of its
-- day; those added since (limits, commands, processes, leads) are revoked here, and the worker
-- role keeps them all. Grants to other roles made by name (start_process, send_lead, ...) stay.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
