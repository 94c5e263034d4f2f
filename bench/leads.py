"""The leads scenario (`pgdispatch bench --scenario leads`): a bulk resend of 10,000 leads to
3 integrations each (a webhook, a Telegram bot, a Bitrix24 portal) on local stand-ins that
enforce the vendors' published limits (bench/vendors.py). 100 entities of 100 leads, each
entity with its own three credentials, so the per-credential limits shape the run.

Measured: the resend itself (dispatch.resend_leads in chunks, as `leads resend` does), the
drain by one worker with its defaults, deliveries/s, and the limits: requests the stand-ins
refused for a limit (0 means every vendor limit was respected)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from pgdispatch.bench.scenarios import OURS, Result, fresh_database, local_server

ENTITIES, LEADS_PER_ENTITY = 100, 100
REFUSED = "leads: requests refused for a vendor limit"
CHUNK = 500


def leads(server_url: str) -> list[Result]:
    record = Path(tempfile.mkdtemp(prefix="pgd-vendors-")) / "record.json"
    with fresh_database(server_url) as url, \
            local_server("pgdispatch.bench.vendors", "--record", str(record)) as base:
        with psycopg.connect(url, autocommit=True) as conn:
            _setup(conn, base)
            ids = [r[0] for r in conn.execute("SELECT id FROM dispatch.leads ORDER BY id").fetchall()]
            started = time.perf_counter()
            for start in range(0, len(ids), CHUNK):
                conn.execute("SELECT dispatch.resend_leads(%s)", (ids[start:start + CHUNK],))
            resend_seconds = time.perf_counter() - started
            deliveries = conn.execute("SELECT count(*) FROM dispatch.deliveries").fetchone()
        worker = subprocess.Popen([sys.executable, "-m", "pgdispatch", "worker", "--queue", "leads",
                                   "--drain", "--allow-private-networks"],
                                  env={**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING"})
        if worker.wait() != 0:
            raise RuntimeError(f"pgdispatch worker exited {worker.returncode}")
        with psycopg.connect(url) as conn:
            row = conn.execute("""SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*),
                                         extract(epoch FROM max(finished_at) - min(created_at))
                                  FROM dispatch.deliveries""").fetchone()
    assert row is not None and deliveries is not None
    seen = json.loads(record.read_text())
    record.unlink()
    succeeded, total, seconds = int(row[0]), int(row[1]), float(row[2])
    return [{"scenario": "leads: bulk resend 10,000 leads x 3 integrations", "system": OURS,
             "unit": "deliveries/s", "value": round(succeeded / seconds), "deliveries": total,
             "succeeded": succeeded, "seconds": round(seconds, 1), "resend_seconds": round(resend_seconds, 2),
             "accepted_by_vendor": seen["accepted"]},
            {"scenario": REFUSED, "system": OURS, "unit": "requests", "value": sum(seen["refused"].values()),
             "by_channel": seen["refused"]}]


def _setup(conn: psycopg.Connection[tuple[object, ...]], base: str) -> None:
    for entity in range(1, ENTITIES + 1):
        token = f"{100000 + entity}:BenchToken{entity:04d}abcdefghijklmnopq"
        for type_, settings in (("webhooks", {"url": f"{base}/hook/{entity}"}),
                                ("telegram", {"bot_token": token, "chat_id": entity, "base_url": base}),
                                ("bitrix24", {"webhook_url": f"{base}/rest/1/portal{entity}/"})):
            conn.execute("""WITH c AS (INSERT INTO dispatch.credentials (type, name, settings)
                                       VALUES (%s, %s, %s) RETURNING id)
                            INSERT INTO dispatch.entity_credentials SELECT %s, id FROM c""",
                         (type_, f"{type_} {entity}", json.dumps(settings), entity))
    # Leads of all entities interleaved, as they arrive in a day: lead n belongs to entity n % 100.
    conn.execute("""INSERT INTO dispatch.leads (external_entity_id, external_project_id, data)
                    SELECT 1 + n %% %s, NULL,
                           jsonb_build_object('name', 'Lead ' || n, 'phone', '+48 600 ' || n)
                    FROM generate_series(1, %s) n""", (ENTITIES, ENTITIES * LEADS_PER_ENTITY))
