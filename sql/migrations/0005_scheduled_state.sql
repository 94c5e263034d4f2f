-- 0005: a job whose run_at lies ahead is 'scheduled', not 'available', so the claim never walks
-- rows it cannot run yet. The value is added on its own: PostgreSQL lets a new enum value be used
-- only after the transaction that added it commits (0006 uses it).
ALTER TYPE dispatch.job_state ADD VALUE IF NOT EXISTS 'scheduled';
