"""The SQL API, exercised with plain SQL as another system would."""

from __future__ import annotations

import psycopg
import pytest

Conn = psycopg.Connection[tuple[object, ...]]


def claim(conn: Conn, n: int = 10, queue: str = "default", kinds: tuple[str, ...] = ("k",),
          version: int = 0, lease: str = "30 seconds") -> list[tuple[object, ...]]:
    return conn.execute(
        "SELECT id, lease_token, attempt, expired FROM dispatch.claim_jobs_v2('w', %s, %s, %s, %s, %s::interval)",
        (queue, list(kinds), version, n, lease)).fetchall()


def finish(conn: Conn, items: list[tuple[int, object, str]], delay: float | None = None,
           reason: str | None = None, error: str | None = None) -> int:
    row = conn.execute(
        "SELECT dispatch.finish_jobs_v2(%s, %s, %s, %s, %s, %s, %s, %s::jsonb[])",
        ([i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
         [delay] * len(items), [reason] * len(items), [error] * len(items), [None] * len(items),
         [None] * len(items)),
    ).fetchone()
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


def count(conn: Conn, query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


def test_plain_insert_and_enqueue_create_jobs(conn: Conn) -> None:
    conn.execute("INSERT INTO dispatch.jobs (queue, kind, args) VALUES ('default', 'debug.noop', '{}')")
    row = conn.execute("SELECT dispatch.enqueue('debug.noop', '{\"a\": 1}', priority => 5, tenant => 't1')").fetchone()
    assert row is not None and isinstance(row[0], int)
    rows = conn.execute("SELECT kind, args, priority, tenant, state::text, attempt FROM dispatch.jobs ORDER BY id").fetchall()
    assert rows == [("debug.noop", {}, 0, None, "available", 0), ("debug.noop", {"a": 1}, 5, "t1", "available", 0)]


@pytest.mark.parametrize(("statement", "message"), [
    ("INSERT INTO dispatch.jobs (queue, kind) VALUES ('nope', 'k')", "job_queue_must_exist_in_dispatch_queues"),
    ("INSERT INTO dispatch.jobs (kind, args) VALUES ('k', '[1]')", "job_args_must_be_a_json_object"),
    ("INSERT INTO dispatch.jobs (kind, args) VALUES ('k', '\"s\"')", "job_args_must_be_a_json_object"),
    ("INSERT INTO dispatch.jobs (kind, priority) VALUES ('k', 101)", "job_priority_between_minus_100_and_100"),
    ("INSERT INTO dispatch.jobs (kind, run_at) VALUES ('k', 'garbage')", 'invalid input syntax for type timestamp'),
    ("INSERT INTO dispatch.jobs (kind) VALUES ('has space')", "job_kind_format"),
    ("INSERT INTO dispatch.jobs (kind) VALUES (NULL)", 'null value in column "kind"'),
    ("INSERT INTO dispatch.jobs (kind, max_attempts) VALUES ('k', 0)", "job_max_attempts_positive"),
    ("INSERT INTO dispatch.jobs (kind, args) VALUES ('k', jsonb_build_object('x', repeat(md5(random()::text), 70000)))", "job_args_at_most_1mb"),
    ("SELECT dispatch.enqueue('k', '[]')", "args must be a JSON object, got array"),
    ("SELECT dispatch.enqueue(NULL)", "kind must not be null"),
    ("INSERT INTO dispatch.queues (name) VALUES ('Bad Name')", "queue_name_format"),
    ("UPDATE dispatch.queues SET backoff_jitter = 2", "queue_backoff_jitter_fraction"),
])
def test_bad_rows_are_refused_with_a_message_that_names_the_problem(conn: Conn, statement: str, message: str) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(statement)
    assert message in str(info.value)
    assert count(conn, "SELECT count(*) FROM dispatch.jobs") == 0


def test_idempotency_key_returns_existing_job_while_live_and_within_window(conn: Conn) -> None:
    first = conn.execute("SELECT dispatch.enqueue('k', idempotency_key => 'order-1')").fetchone()
    again = conn.execute("SELECT dispatch.enqueue('k', idempotency_key => 'order-1')").fetchone()
    assert first == again
    # A plain INSERT of a taken key is skipped, not an error.
    conn.execute("INSERT INTO dispatch.jobs (kind, idempotency_key) VALUES ('k', 'order-1')")
    assert count(conn, "SELECT count(*) FROM dispatch.jobs") == 1
    # Another queue is another namespace.
    conn.execute("INSERT INTO dispatch.queues (name) VALUES ('other')")
    other = conn.execute("SELECT dispatch.enqueue('k', queue => 'other', idempotency_key => 'order-1')").fetchone()
    assert other != first
    # Finished: the key is retained for the queue's dedupe window.
    (job_id, token, _, _), = claim(conn)
    assert finish(conn, [(job_id, token, "completed")]) == 1
    after = conn.execute("SELECT dispatch.enqueue('k', idempotency_key => 'order-1')").fetchone()
    assert after == first
    assert count(conn, "SELECT count(*) FROM dispatch.jobs WHERE queue = 'default'") == 0
    # Past the window, the key is free again.
    conn.execute("UPDATE dispatch.idempotency_keys SET expires_at = now() - interval '1 second'")
    fresh = conn.execute("SELECT dispatch.enqueue('k', idempotency_key => 'order-1')").fetchone()
    assert fresh != first


def test_claim_order_is_priority_then_run_at_then_id(conn: Conn) -> None:
    conn.execute("""INSERT INTO dispatch.jobs (kind, priority, run_at) VALUES
        ('k', 5, now() - interval '1 hour'), ('k', 0, now() - interval '1 minute'),
        ('k', 0, now() - interval '2 minutes'), ('k', -1, now()), ('k', 0, now() + interval '1 hour')""")
    ids = [r[0] for r in claim(conn, 10)]
    assert ids == [4, 3, 2, 1]  # the scheduled one (id 5) is not runnable yet


def test_claim_skips_unknown_kinds_newer_builds_and_paused_queues(conn: Conn) -> None:
    # A live worker runs kind k at build 7; nobody runs 'unknown'.
    conn.execute("INSERT INTO dispatch.workers (id, host, pid, version, queues, slots, kinds) VALUES ('w7', 'h', 1, 7, '{*}', 1, '{k}')")
    conn.execute("INSERT INTO dispatch.jobs (kind, version) VALUES ('k', 0), ('unknown', 0), ('k', 7)")
    assert [r[0] for r in claim(conn, 10, version=5)] == [1]
    assert [r[0] for r in claim(conn, 10, version=7)] == [3]
    conn.execute("INSERT INTO dispatch.jobs (kind) VALUES ('k')")
    conn.execute("UPDATE dispatch.queues SET paused = true WHERE name = 'default'")
    assert claim(conn, 10) == []


def test_a_short_claim_parks_what_no_live_worker_runs_until_one_starts(conn: Conn) -> None:
    conn.execute("INSERT INTO dispatch.workers (id, host, pid, version, queues, slots, kinds) VALUES ('w', 'h', 1, 0, '{default}', 1, '{k}')")
    conn.execute("INSERT INTO dispatch.jobs (kind, version) VALUES ('k', 0), ('unknown', 0), ('k', 9)")
    assert [r[0] for r in claim(conn, 10)] == [1]
    # Idle polls no longer walk the two rows nobody can run: they are parked for five minutes.
    rows = conn.execute("SELECT id, state::text, parked_at IS NOT NULL, run_at > now() + interval '290 s' FROM dispatch.jobs ORDER BY id").fetchall()
    assert rows == [(1, "running", False, False), (2, "scheduled", True, True), (3, "scheduled", True, True)]
    assert conn.execute("SELECT state FROM dispatch.job_list WHERE id = 2").fetchone() == ("parked",)
    # A worker that runs 'unknown' starts: it takes its jobs back at once; build 9 still waits.
    assert conn.execute("SELECT dispatch.unpark_jobs_v1('{unknown}', 0, '{*}')").fetchone() == (1,)
    assert [r[0] for r in claim(conn, 10, kinds=("unknown",))] == [2]
    assert conn.execute("SELECT parked_at IS NOT NULL FROM dispatch.jobs WHERE id = 3").fetchone() == (True,)


def test_version_default_comes_from_the_session_setting(conn: Conn) -> None:
    conn.execute("SET dispatch.build = '42'")
    conn.execute("INSERT INTO dispatch.jobs (kind) VALUES ('k')")
    conn.execute("RESET dispatch.build")
    conn.execute("INSERT INTO dispatch.jobs (kind) VALUES ('k')")
    assert conn.execute("SELECT version FROM dispatch.jobs ORDER BY id").fetchall() == [(42,), (0,)]


def test_two_claimers_never_get_the_same_job(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as setup:
        setup.execute("INSERT INTO dispatch.jobs (kind) SELECT 'k' FROM generate_series(1, 100)")
    with psycopg.connect(db_url) as a, psycopg.connect(db_url) as b:
        got_a = claim(a, 60)  # a's transaction still holds its row locks
        got_b = claim(b, 60)
        a.commit()
        b.commit()
    ids_a = {r[0] for r in got_a}
    ids_b = {r[0] for r in got_b}
    assert len(ids_a) == 60 and len(ids_b) == 40 and not ids_a & ids_b


def test_stale_token_cannot_finish_a_newer_attempt(conn: Conn) -> None:
    conn.execute("INSERT INTO dispatch.jobs (kind) VALUES ('k')")
    (job_id, old_token, attempt, _), = claim(conn, lease="1 second")
    assert attempt == 1
    conn.execute("UPDATE dispatch.jobs SET lease_expires_at = now() - interval '1 second'")
    assert count(conn, "SELECT dispatch.rescue_expired_v2()") == 1
    conn.execute("UPDATE dispatch.jobs SET run_at = now()")  # past the rescue's backoff
    (job_id2, new_token, attempt2, _), = claim(conn)
    assert job_id2 == job_id and attempt2 == 2 and new_token != old_token
    # The old holder wakes up and tries every outcome: none counts.
    for outcome in ("completed", "retry", "dead", "release"):
        assert finish(conn, [(job_id, old_token, outcome)], delay=0, reason="discarded") == 0
    assert conn.execute("SELECT state::text, attempt FROM dispatch.jobs").fetchall() == [("running", 2)]
    assert finish(conn, [(job_id, new_token, "completed")]) == 1
    outcomes = conn.execute("SELECT attempt, outcome FROM dispatch.job_history ORDER BY finished_at, attempt").fetchall()
    assert outcomes == [(1, "rescued"), (2, "completed")]


def test_retry_backs_off_then_exhausts_into_dead_jobs(conn: Conn) -> None:
    conn.execute("SELECT dispatch.enqueue('k', '{\"secret\": \"x\"}', max_attempts => 2)")
    (job_id, token, _, _), = claim(conn)
    assert finish(conn, [(job_id, token, "retry")], delay=60, error="boom 1") == 1
    row = conn.execute("SELECT state::text, attempt, last_error, run_at > now() + interval '59 seconds' FROM dispatch.jobs").fetchone()
    assert row == ("scheduled", 1, "boom 1", True)
    conn.execute("UPDATE dispatch.jobs SET run_at = now()")
    (job_id, token, attempt, _), = claim(conn)
    assert attempt == 2
    assert finish(conn, [(job_id, token, "retry")], delay=60, error="boom 2") == 1
    assert count(conn, "SELECT count(*) FROM dispatch.jobs") == 0
    dead = conn.execute("SELECT job_id, reason, attempt, last_error FROM dispatch.dead_jobs").fetchone()
    assert dead == (job_id, "exhausted", 2, "boom 2")


def test_retry_past_expiry_is_dead_expired(conn: Conn) -> None:
    conn.execute("SELECT dispatch.enqueue('k', expire_at => now() + interval '30 seconds')")
    (job_id, token, _, expired), = claim(conn)
    assert expired is False
    assert finish(conn, [(job_id, token, "retry")], delay=60, error="down") == 1
    assert conn.execute("SELECT reason FROM dispatch.dead_jobs").fetchall() == [("expired",)]


def test_claim_flags_expired_jobs(conn: Conn) -> None:
    conn.execute("INSERT INTO dispatch.jobs (kind, created_at, expire_at) VALUES ('k', now() - interval '2 hours', now() - interval '1 hour')")
    (_, _, _, expired), = claim(conn)
    assert expired is True


def test_release_does_not_count_the_attempt_and_wakes_workers(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url, autocommit=True) as c:
        listener.execute("LISTEN dispatch_jobs")
        c.execute("INSERT INTO dispatch.jobs (kind) VALUES ('k')")
        (job_id, token, _attempt, _), = claim(c)
        assert finish(c, [(job_id, token, "release")]) == 1
        assert c.execute("SELECT state::text, attempt FROM dispatch.jobs").fetchall() == [("available", 0)]
        payloads = [n.payload for n in listener.notifies(timeout=1, stop_after=2)]
        assert payloads == ["default", "default"]  # the insert, then the release


def test_insert_trigger_notifies_once_per_queue_per_statement(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url, autocommit=True) as c:
        listener.execute("LISTEN dispatch_jobs")
        c.execute("INSERT INTO dispatch.queues (name) VALUES ('mail')")
        c.execute("INSERT INTO dispatch.jobs (queue, kind) SELECT q, 'k' FROM unnest(ARRAY['default','mail','default']) q")
        c.execute("INSERT INTO dispatch.jobs (kind, run_at) VALUES ('k', now() + interval '1 hour')")
        payloads = sorted(n.payload for n in listener.notifies(timeout=0.5))
        assert payloads == ["default", "mail"]


def test_queue_change_notifies_config_channel(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url, autocommit=True) as c:
        listener.execute("LISTEN dispatch_config")
        c.execute("UPDATE dispatch.queues SET paused = true")
        notes = list(listener.notifies(timeout=1, stop_after=1))
        assert notes and '"queues"' in notes[0].payload


def test_retry_dead_revives_under_the_original_id(conn: Conn) -> None:
    conn.execute("SELECT dispatch.enqueue('k', '{\"n\": 1}')")
    (job_id, token, _, _), = claim(conn)
    finish(conn, [(job_id, token, "dead")], reason="invalid", error="bad args")
    revived = conn.execute("SELECT dispatch.retry_dead(ARRAY[%s, 999])", (job_id,)).fetchall()
    assert revived == [(job_id,)]
    assert conn.execute("SELECT id, args, attempt, state::text FROM dispatch.jobs").fetchall() == [(job_id, {"n": 1}, 0, "available")]
    assert count(conn, "SELECT count(*) FROM dispatch.dead_jobs") == 0


def test_queue_stats_counts_every_state(conn: Conn) -> None:
    conn.execute("""INSERT INTO dispatch.jobs (kind, run_at) VALUES ('k', now() - interval '10 seconds'),
                    ('k', now()), ('k', now() + interval '1 hour')""")
    (_job_id, _token, _, _), = claim(conn, 1)
    conn.execute("INSERT INTO dispatch.jobs (kind) VALUES ('k')")
    (j2, t2, _, _), = claim(conn, 1)
    finish(conn, [(j2, t2, "dead")], reason="discarded")
    row = conn.execute("SELECT available, scheduled, running, dead, oldest_wait_seconds > 0 FROM dispatch.queue_stats WHERE queue = 'default'").fetchone()
    assert row == (1, 1, 1, 1, True)


def test_history_is_partitioned_by_day_a_week_ahead_with_no_default_partition(conn: Conn) -> None:
    parts = conn.execute("""SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                            WHERE i.inhparent = 'dispatch.job_history'::regclass""").fetchall()
    names = {p[0] for p in parts}
    assert "job_history_default" not in names and len(names) >= 9
    assert count(conn, "SELECT count(*) FROM dispatch.history_partitions_older_than(interval '14 days')") == 0
    # A partition older than the retention is listed for the worker to detach and drop.
    conn.execute("SELECT dispatch.create_history_partition('2000-01-01')")
    assert conn.execute("SELECT * FROM dispatch.history_partitions_older_than(interval '14 days')").fetchall() == [("job_history_20000101", False)]


def test_mask_secrets_hides_secret_looking_keys_at_any_depth(conn: Conn) -> None:
    row = conn.execute("""SELECT dispatch.mask_secrets('{"api_key": "k", "user": "u",
        "nested": {"Authorization": "Bearer x", "list": [{"password": "p", "ok": 1}]}}')""").fetchone()
    assert row == ({"api_key": "***", "user": "u",
                    "nested": {"Authorization": "***", "list": [{"password": "***", "ok": 1}]}},)


def test_roles_producer_can_only_enqueue_reader_sees_masked_views(conn: Conn) -> None:
    conn.execute("SELECT dispatch.enqueue('k', '{\"token\": \"s3cr3t\"}')")
    conn.execute("SET ROLE dispatch_producer")
    conn.execute("SELECT dispatch.enqueue('k')")
    conn.execute("INSERT INTO dispatch.jobs (kind) VALUES ('k') RETURNING id")
    conn.execute("SELECT dispatch.send_request('GET', 'https://a.example/x')")
    for forbidden in ("SELECT args FROM dispatch.jobs", "SELECT * FROM dispatch.dead_jobs",
                      "SELECT * FROM dispatch.job_list", "DELETE FROM dispatch.jobs",
                      "SELECT * FROM dispatch.signing_keys", "SELECT * FROM dispatch.request_attempts",
                      "SELECT * FROM dispatch.job_history"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(forbidden)
    conn.execute("RESET ROLE")
    conn.execute("SET ROLE dispatch_reader")
    args = [r[0] for r in conn.execute("SELECT args FROM dispatch.job_list ORDER BY id").fetchall()]
    assert args[0] == {"token": "***"}
    assert conn.execute("SELECT count(*) FROM dispatch.queue_stats").fetchone() == (4,)  # crm, default, leads, requests
    assert conn.execute("SELECT count(*) FROM dispatch.request_attempts").fetchone() == (0,)
    for forbidden in ("SELECT * FROM dispatch.jobs", "SELECT dispatch.enqueue('k')",
                      "UPDATE dispatch.queues SET paused = true", "SELECT * FROM dispatch.signing_keys",
                      "SELECT dispatch.send_request('GET', 'https://a.example/x')"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(forbidden)
    conn.execute("RESET ROLE")
    conn.execute("SET ROLE dispatch_worker")
    assert len(claim(conn, 10)) == 3
    assert conn.execute("SELECT count(*) FROM dispatch.signing_keys").fetchone() == (0,)
