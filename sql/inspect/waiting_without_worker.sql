-- Runnable jobs no live worker can take: no alive worker serves the queue, knows the kind, and
-- runs a build at least as new as the job's.
SELECT j.queue, j.kind, j.version, count(*) AS jobs, min(j.run_at) AS oldest
FROM dispatch.jobs j
WHERE j.state <> 'running' AND (j.run_at <= now() OR j.parked_at IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM dispatch.worker_status w
                  WHERE w.status = 'alive' AND ('*' = ANY (w.queues) OR j.queue = ANY (w.queues))
                    AND j.kind = ANY (w.kinds) AND w.version >= j.version)
GROUP BY 1, 2, 3 ORDER BY jobs DESC;
