-- Blanket grants, last: every function executable by the worker only unless granted above.
-- (One part of the fresh schema, applied in file order; the migrations build the same.)

REVOKE ALL ON ALL TABLES IN SCHEMA dispatch FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;

-- Functions are executable by PUBLIC when created. 0006 revoked that for the functions of its
-- day; those added since (limits, commands, processes, leads) are revoked here, and the worker
-- role keeps them all. Grants to other roles made by name (start_process, send_lead, ...) stay.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
