-- Running jobs whose lease has expired: their worker is gone; the next rescue sweep takes them.
SELECT id, queue, kind, attempt, leased_by, lease_expires_at, now() - lease_expires_at AS overdue
FROM dispatch.jobs
WHERE state = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at;
