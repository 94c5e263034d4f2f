"""CRM call events (seed 004), the SQL side: enterprises and their checked config, the change
notifications the workers' caches listen to, and call events fanned out once per CRM."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import psycopg
import pytest

RETAILCRM = {"enabled": True, "api_url": "https://acme.retailcrm.ru", "api_key": "api-key-PLANTED",
             "client_id": "vochi-asterisk", "user_mappings": {"151": 16, "152": 18}}


def enterprise(conn: psycopg.Connection[Any], number: str = "0367", **config: Any) -> None:
    conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES (%s, %s, %s)",
                 (number, f"Enterprise {number}", json.dumps(config or {"retailcrm": RETAILCRM})))


@pytest.mark.parametrize(("config", "message"), [
    ({"retailcrm": {**RETAILCRM, "enabled": "yes"}}, "retailcrm.enabled must be true or false"),
    ({"retailcrm": {**RETAILCRM, "api_url": "acme.retailcrm.ru"}}, "retailcrm.api_url must be the account URL"),
    ({"retailcrm": {**RETAILCRM, "api_key": ""}}, "retailcrm.api_key must be a non-empty string"),
    ({"retailcrm": {**RETAILCRM, "user_mappings": {"151": "Ann"}}}, "retailcrm.user_mappings must map extensions"),
    ({"bitrix": {"enabled": True}}, "bitrix: unknown integration; known: retailcrm, webhook"),
    ({"webhook": {"enabled": True, "url": "ftp://x"}}, "webhook.url must be an http(s) URL"),
    ({"webhook": {"enabled": True, "url": "https://x", "secret": "short"}}, "webhook.secret must be a Standard Webhooks secret"),
    ({"webhook": {"enabled": True, "url": "https://x", "headers": {"X-Team": 7}}}, "webhook.headers must map header names"),
    ([], "integrations_config must be a JSON object"),
])
def test_the_config_of_each_integration_is_checked(conn: psycopg.Connection[Any], config: Any, message: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=re.escape(f"enterprise 0367: {message}")):
        conn.execute("INSERT INTO dispatch.enterprises VALUES ('0367', 'Acme', %s)", (json.dumps(config),))


def test_each_committed_change_notifies_the_enterprise_and_integration_changed(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url) as conn:
        listener.execute("LISTEN dispatch_config")

        def heard() -> list[dict[str, Any]]:
            messages = [json.loads(n.payload) for n in listener.notifies(timeout=0.5, stop_after=200)]
            return [m for m in messages if m["table"] == "enterprises"]  # not the default limit's

        enterprise(conn)
        assert heard() == []  # not committed yet
        conn.commit()
        assert heard() == [{"table": "enterprises", "enterprise": "0367", "integration": "retailcrm"}]
        conn.execute("UPDATE dispatch.enterprises SET name = 'Acme Ltd'")
        conn.commit()
        assert heard() == []  # no integration changed
        conn.execute("UPDATE dispatch.enterprises SET integrations_config = "
                     "jsonb_set(integrations_config, '{retailcrm,enabled}', 'false')")
        conn.rollback()
        assert heard() == []  # rolled back: nothing happened
        conn.execute("UPDATE dispatch.enterprises SET integrations_config = "
                     "jsonb_set(integrations_config, '{retailcrm,api_key}', '\"new-key\"')")
        conn.commit()
        assert heard() == [{"table": "enterprises", "enterprise": "0367", "integration": "retailcrm"}]
        # A bulk change: one "reload all", not one message per row.
        conn.execute("""INSERT INTO dispatch.enterprises
                        SELECT 'e' || n, 'E', jsonb_build_object('retailcrm', %s::jsonb)
                        FROM generate_series(1, 150) n""", (json.dumps(RETAILCRM),))
        conn.commit()
        assert heard() == [{"table": "enterprises"}]
        conn.execute("DELETE FROM dispatch.enterprises WHERE number = '0367'")
        conn.commit()
        assert heard() == [{"table": "enterprises", "enterprise": "0367", "integration": "retailcrm"}]


def test_a_call_event_makes_one_job_per_enabled_crm_once(conn: psycopg.Connection[Any]) -> None:
    enterprise(conn)
    enterprise(conn, "0400", retailcrm={**RETAILCRM, "enabled": False})
    first = conn.execute("SELECT * FROM dispatch.call_event('0367', 'dial', 'c-1', '{\"phone\": \"+48\"}')").fetchall()
    assert [(i, created) for i, _, created in first] == [("retailcrm", True)]
    again = conn.execute("SELECT * FROM dispatch.call_event('0367', 'dial', 'c-1', '{}')").fetchall()
    assert again == [("retailcrm", first[0][1], False)]  # the same job, nothing new
    hangup = conn.execute("SELECT * FROM dispatch.call_event('0367', 'hangup', 'c-1', '{}')").fetchall()
    assert hangup[0][1] != first[0][1] and hangup[0][2]
    assert conn.execute("SELECT * FROM dispatch.call_event('0400', 'dial', 'c-2', '{}')").fetchall() == []
    job = conn.execute("SELECT queue, kind, tenant, args FROM dispatch.jobs WHERE id = %s", (first[0][1],)).fetchone()
    assert job == ("crm", "crm.event", "enterprise:0367", {
        "enterprise": "0367", "integration": "retailcrm", "event": "dial", "call_unique_id": "c-1",
        "payload": {"phone": "+48"}})
    with pytest.raises(psycopg.errors.CheckViolation, match="event must be dial, bridge, hangup or download"):
        conn.execute("SELECT * FROM dispatch.call_event('0367', 'ring', 'c-1', '{}')")
    conn.rollback()
    with pytest.raises(psycopg.errors.NoDataFound, match=r"dispatch\.call_event: no enterprise 9999"):
        conn.execute("SELECT * FROM dispatch.call_event('9999', 'dial', 'c-1', '{}')")


def test_concurrent_duplicates_create_one_job_and_all_return_it(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        enterprise(conn)
    # The first sender's transaction is open when the others send the same event: they wait for
    # it, then find its job.
    with psycopg.connect(db_url) as first:
        made = first.execute("SELECT * FROM dispatch.call_event('0367', 'bridge', 'c-9', '{}')").fetchall()
        answers: list[Any] = []

        def duplicate() -> None:
            with psycopg.connect(db_url, autocommit=True) as other:
                answers.append(other.execute("SELECT * FROM dispatch.call_event('0367', 'bridge', 'c-9', '{}')"
                                             ).fetchall())

        threads = [threading.Thread(target=duplicate) for _ in range(4)]
        for thread in threads:
            thread.start()
        with psycopg.connect(db_url, autocommit=True) as watcher:  # all four wait on the first's row
            for _ in range(200):
                waiting = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                          "AND datname = current_database() "
                                          "AND query LIKE '%call_event%'").fetchone()
                if waiting == (4,):
                    break
                threading.Event().wait(0.05)
            assert waiting == (4,)
        first.commit()
        for thread in threads:
            thread.join(10)
    assert answers == [[("retailcrm", made[0][1], False)]] * 4
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM dispatch.jobs WHERE kind = 'crm.event'").fetchone() == (1,)


def test_config_secrets_are_for_the_worker_and_producers_send_events(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        enterprise(conn)
        conn.execute("SET ROLE dispatch_reader")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT integrations_config FROM dispatch.enterprises")
        conn.execute("RESET ROLE")
        conn.execute("SET ROLE dispatch_producer")
        assert conn.execute("SELECT * FROM dispatch.call_event('0367', 'dial', 'c-3', '{}')").fetchone() is not None
        assert conn.execute("SELECT * FROM dispatch.call_events(%s)", (json.dumps([
            {"enterprise": "0367", "event": "hangup", "call_unique_id": "c-3", "payload": {}}]),)).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT integrations_config FROM dispatch.enterprises")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM dispatch.call_event_targets('[]')")


def test_a_batch_of_events_is_taken_as_each_event_would_be(conn: psycopg.Connection[Any]) -> None:
    enterprise(conn)
    enterprise(conn, "0400", retailcrm={**RETAILCRM, "enabled": False})

    def batch(*events: dict[str, Any]) -> list[tuple[Any, ...]]:
        return conn.execute("SELECT n, enterprise, event, call_unique_id, integration, job_id, created "
                            "FROM dispatch.call_events(%s)", (json.dumps(events),)).fetchall()

    first = conn.execute("SELECT job_id FROM dispatch.call_event('0367', 'dial', 'c-1', '{}')").fetchone()
    rows = batch({"enterprise": "0367", "event": "dial", "call_unique_id": "c-1", "payload": {}},  # sent before
                 {"enterprise": "0367", "event": "bridge", "call_unique_id": "c-1", "payload": {"extension": "151"}},
                 {"enterprise": "0367", "event": "bridge", "call_unique_id": "c-1", "payload": {}},  # twice in it
                 {"enterprise": "0400", "event": "dial", "call_unique_id": "c-2", "payload": {}})  # no CRM enabled
    assert [(n, event, created) for n, _, event, _, _, _, created in rows] == [
        (1, "dial", False), (2, "bridge", True), (3, "bridge", False)]
    assert rows[0][5] == first[0] and rows[1][5] == rows[2][5]  # type: ignore[index]
    job = conn.execute("SELECT args -> 'payload' FROM dispatch.jobs WHERE id = %s", (rows[1][5],)).fetchone()
    assert job == ({"extension": "151"},)  # the first of the batch's duplicates
    for events, error, message in [
        ({"enterprise": "0367"}, psycopg.errors.CheckViolation, "dispatch.call_events: events must be a JSON array"),
        ([{"enterprise": "0367", "event": "dial", "call_unique_id": "x", "payload": {}}, "oops"],
         psycopg.errors.CheckViolation, r"dispatch.call_events: events\[2\]: must be an object"),
        ([{"enterprise": "0367", "event": "dial", "call_unique_id": "x", "payload": {}},
          {"enterprise": "9999", "event": "dial", "call_unique_id": "x", "payload": {}}],
         psycopg.errors.NoDataFound, r"dispatch.call_events: events\[2\]: no enterprise 9999"),
        ([{"enterprise": "0367", "event": "dial", "call_unique_id": "", "payload": {}}, {}],
         psycopg.errors.CheckViolation, r"events\[1\]: call_unique_id must be 1 to 255 characters"),
        ([{"enterprise": "0367", "event": "dial", "call_unique_id": "x"}, {}],
         psycopg.errors.CheckViolation, r"events\[1\]: payload must be a JSON object"),
    ]:
        with pytest.raises(error, match=message):
            conn.execute("SELECT * FROM dispatch.call_events(%s)", (json.dumps(events),))
    # A refused batch leaves nothing, not even its valid elements' jobs: the two jobs are c-1's.
    assert conn.execute("SELECT count(*) FROM dispatch.jobs").fetchone() == (2,)
