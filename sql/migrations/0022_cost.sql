-- Cost per job (issue 23): the checks on a job's kind and args run when a row is written with
-- them (an insert, an update that sets them), not on every claim and finish. As CHECK
-- constraints PostgreSQL evaluated them on each UPDATE of the row, whatever it set: the claim
-- (state, lease) re-ran the kind's regular expression and walked the args for their depth,
-- a tenth of the server's CPU per no-op job. A refused row still names the rule it broke,
-- as the constraint did (SQLSTATE 23514 with its name as the constraint).

ALTER TABLE dispatch.jobs
    DROP CONSTRAINT job_kind_format,
    DROP CONSTRAINT job_args_must_be_a_json_object,
    DROP CONSTRAINT job_args_at_most_1mb,
    DROP CONSTRAINT job_args_nesting_at_most_100;

CREATE FUNCTION dispatch.refuse_job_row() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rule text;
BEGIN
    rule := CASE
        WHEN NOT NEW.kind ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$' THEN 'job_kind_format'
        WHEN jsonb_typeof(NEW.args) <> 'object' THEN 'job_args_must_be_a_json_object'
        WHEN pg_column_size(NEW.args) > 1048576 THEN 'job_args_at_most_1mb'
        ELSE 'job_args_nesting_at_most_100' END;
    RAISE EXCEPTION 'new row for relation "jobs" violates check constraint "%"', rule
        USING ERRCODE = 'check_violation', CONSTRAINT = rule, SCHEMA = 'dispatch', TABLE = 'jobs';
END $$;

-- After the other BEFORE triggers (they fire in name order), where the constraints ran: a
-- duplicate key is skipped before its row is checked.
CREATE TRIGGER jobs_validate_row BEFORE INSERT OR UPDATE OF kind, args ON dispatch.jobs
    FOR EACH ROW WHEN (NOT (NEW.kind ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$'
                            AND jsonb_typeof(NEW.args) = 'object'
                            AND pg_column_size(NEW.args) <= 1048576
                            AND NOT jsonb_path_exists(NEW.args, 'strict $.**{101}')))
    EXECUTE FUNCTION dispatch.refuse_job_row();

-- As 09_grants gives every function of the schema.
REVOKE ALL ON FUNCTION dispatch.refuse_job_row() FROM PUBLIC;
GRANT ALL ON FUNCTION dispatch.refuse_job_row() TO dispatch_worker;
