-- What failed in the last hour, grouped by error.
SELECT queue, kind, outcome, left(error, 120) AS error, count(*) AS attempts
FROM dispatch.job_history
WHERE outcome IN ('retried', 'dead', 'rescued') AND finished_at > now() - interval '1 hour'
GROUP BY 1, 2, 3, 4 ORDER BY attempts DESC LIMIT 50;
