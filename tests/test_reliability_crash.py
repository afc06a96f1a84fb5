"""Issue 7, crashes: SIGKILL the gateway at random moments during an SMTP load; every message that got a 250
ends delivered exactly once in the Odoo double — no record twice, no post twice."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.schema import message_body_refs
from gateway.spool import counts_by_state
from gateway.store import open_store
from tests.gateway_proc import GatewayProcess, base_config, free_port
from tests.load_client import load_mail, run_load
from tests.odoo_double import OdooDouble
from tests.waiting import wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

MESSAGES = 2000
KILLS = 5


def test_sigkill_during_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(7)
    odoo = OdooDouble().start()
    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port(), odoo_url=odoo.url)
    gw = GatewayProcess(tmp_path, cfg).start()
    # every third mail is over `body_log_min` (64 KiB): its body goes to a body log segment, the rest to SQLite
    mails = [load_mail(i, size=2048 if i % 3 else 70_000) for i in range(MESSAGES)]
    kills: list[float] = []
    done = threading.Event()

    load_over = threading.Event()

    def chaos() -> None:
        # Kill at random moments while the load runs (accepting, committing, routing and delivering). The
        # load is throttled by the kills themselves; should it still end first, the remaining kills hit the
        # workers while they drain, which is the other half of the contract.
        while len(kills) < KILLS and not done.is_set():
            time.sleep(rng.uniform(0.3, 1.2))
            gw.kill()
            kills.append(time.monotonic())
            during_load.append(not load_over.is_set())
            time.sleep(rng.uniform(0.1, 0.6))
            gw.start()

    during_load: list[bool] = []

    killer = threading.Thread(target=chaos)
    killer.start()
    try:
        result = asyncio.run(run_load(gw.smtp_port, mails, sessions=8, deadline=600))
        load_over.set()
        killer.join()
        assert not result.perm_failures
        assert set(result.acked) == {mid for mid, _ in mails}
        # Let the workers drain: every acked message ends in Odoo.
        wait_until(lambda: len({m.get("message_id") for m in odoo.records("mail.message")} & set(result.acked))
              == len(result.acked), timeout=300, what="every acknowledged message in Odoo")
        time.sleep(2)
        per_mid = collections.Counter(m.get("message_id") for m in odoo.records("mail.message")
                                      if str(m.get("message_id", "")).startswith("<load"))
        assert set(per_mid) == set(result.acked)
        assert max(per_mid.values()) == 1, [k for k, v in per_mid.items() if v > 1][:5]
        leads = collections.Counter(lead["name"] for lead in odoo.records("crm.lead"))
        assert len(leads) == MESSAGES and max(leads.values()) == 1
        engine = open_store(cfg["storage"]["url"], migrate=False)
        states = counts_by_state(engine)
        with engine.connect() as conn:  # the big third went through the body log, and was read back from it
            logged = conn.execute(select(func.count()).select_from(message_body_refs)).scalar_one()
        assert logged >= len([m for m in mails if len(m[1]) > 65536]), logged
        assert states["received"] == states["routed"] == states["retrying"] == states["dead"] == 0, states
        assert states["quarantined"] == 0
        print(f"\nkills={len(kills)} during_load={sum(during_load)} acked={len(result.acked)} resent_after_error={result.connection_errors} "
              f"acked_twice={sum(1 for v in result.acked.values() if v > 1)} spool={states}")
        assert len(kills) == KILLS
    finally:
        done.set()
        killer.join()
        gw.stop()
        odoo.stop()
