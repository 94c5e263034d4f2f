"""The bench's cost meter (issue 23) against a real worker and server: what it reports per job
has to match what the engine is known to do, or the cost table would mislead."""

from __future__ import annotations

import psycopg

from pgdispatch.bench.cost import RoundTrips
from pgdispatch.bench.scenarios import _our_drain, _queue_noops
from tests.conftest import USED


def test_a_drain_costs_what_the_engine_writes_and_its_cpu_is_counted(db_url: str) -> None:
    _queue_noops(db_url, 2_000)
    drained = _our_drain(db_url)
    assert drained.done == 2_000 and drained.last_done > drained.first_started
    cost = drained.cost
    # A finished no-op job: claimed (an UPDATE), deleted, one history row; nothing else.
    by_table = cost["rows_written_by_table"]
    assert (by_table["jobs"], by_table["history"]) == (2.0, 1.0) and by_table["other"] < 0.05
    assert cost["worker_cpu_us"] > 0 and cost["wal_bytes"] > 100
    if "container" not in USED.get("server", ""):  # the server's backends are processes of this host
        assert cost["pg_cpu_us"] is not None and cost["pg_cpu_us"] > 0


def test_the_proxy_counts_one_round_trip_per_exchange_and_pipelines_as_one(db_url: str) -> None:
    with RoundTrips(db_url) as proxy, psycopg.connect(proxy.url, autocommit=True) as conn:
        before = proxy.count
        for _ in range(10):
            conn.execute("SELECT 1", prepare=False).fetchone()
        assert proxy.count - before == 10
        before = proxy.count
        with conn.pipeline():
            for _ in range(10):
                conn.execute("SELECT 1")
        assert proxy.count - before <= 2  # sent together, answered together
