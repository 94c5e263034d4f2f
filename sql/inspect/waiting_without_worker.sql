-- Runnable jobs no live worker can take: unknown kind, or stamped with a newer build.
SELECT j.queue, j.kind, j.version, count(*) AS jobs, min(j.run_at) AS oldest
FROM dispatch.jobs j
WHERE j.state = 'available' AND j.run_at <= now()
  AND NOT EXISTS (SELECT 1 FROM dispatch.worker_status w
                  WHERE w.status = 'alive' AND j.queue = ANY (w.queues) AND w.version >= j.version)
GROUP BY 1, 2, 3 ORDER BY jobs DESC;
