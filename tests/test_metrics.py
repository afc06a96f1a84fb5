"""`/metrics` of a real `mailgate serve`: what its worker processes count must be there too."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

from tests.gateway_proc import GatewayProcess, base_config, free_port
from tests.odoo_double import OdooDouble
from tests.smtp_wire import make_mail
from tests.waiting import wait_until


def _sample(metrics: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_worker_process_metrics_reach_the_admin_endpoint(tmp_path: Path) -> None:
    """Routing and processing run in worker processes (`[worker] processes = 1`, the default): their
    counters and latency histograms were counted in those processes and never shown by the serve process's
    `/metrics`, so processing latency — one of the figures the admin port exists for — read 0 forever."""
    odoo = OdooDouble().start()
    cfg = base_config(tmp_path, smtp_port=free_port(), admin_port=free_port(), odoo_url=odoo.url)
    cfg["worker"]["processes"] = 1
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        with smtplib.SMTP("127.0.0.1", gw.smtp_port) as s:
            s.sendmail("alice@client.test", ["sales@example.test"], make_mail(message_id="<m1@client.test>"))
        def delivered() -> str | None:
            metrics = gw.metrics()
            return metrics if _sample(metrics, "mailgate_processing_seconds_count") >= 1 else None

        metrics = wait_until(delivered, timeout=20, what="the worker's processing latency in /metrics")
        assert _sample(metrics, "mailgate_route_seconds_count") == 1
        assert _sample(metrics, "mailgate_processed_total{action=\"create\",state=\"delivered\"}") == 1, metrics[-3000:]
        assert 'mailgate_accepted_total{listener="smtp"} 1.0' in metrics   # the serve process's own, still once
        assert "mailgate_spool_messages{state=" in metrics
        assert re.search(r"^mailgate_spool_free_bytes [0-9.e+]+$", metrics, re.M)
    finally:
        assert gw.stop() == 0
        odoo.stop()


def test_imap_gauges_in_the_multiprocess_exposition(tmp_path: Path) -> None:
    """In multiprocess mode a plain Gauge gains a `pid` label and an Enum is not shared at all: the IMAP
    lag must stay one series per source and the connection state must still be shown."""
    import subprocess
    import sys

    from tests.gateway_proc import ROOT

    script = (
        "from gateway.metrics_dir import prepare; prepare()\n"
        "from sqlalchemy import create_engine\n"
        "from gateway.admin import exposition\n"
        "import gateway.imap as imap\n"
        "imap.LAG.labels('imap:x').set(5)\n"
        "imap.CONNECTION.labels('imap:x').state('idle')\n"
        "print(exposition(create_engine('sqlite://'), None)().decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "m")})
    assert out.returncode == 0, out.stderr
    assert 'mailgate_imap_lag_seconds{source="imap:x"} 5.0' in out.stdout
    assert 'mailgate_imap_connection{mailgate_imap_connection="idle",source="imap:x"} 1.0' in out.stdout


def test_metrics_dirs_of_dead_serve_processes_are_removed_at_start(tmp_path: Path) -> None:
    """A `serve` killed with SIGKILL never runs its atexit: its metrics directory stayed in /tmp, one per
    crash. The next start removes those whose process is gone, and leaves a live one's alone."""
    import os
    import subprocess
    import sys

    from tests.gateway_proc import ROOT

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"mailgate-metrics-{dead.pid}-abc"
    live = tmp_path / f"mailgate-metrics-{os.getpid()}-def"
    unnamed = tmp_path / "mailgate-metrics-xyz"     # the older naming: whose it is cannot be told
    for d in (orphan, live, unnamed):
        d.mkdir()
        (d / "counter_1.db").write_bytes(b"x")
    script = "from gateway.metrics_dir import prepare; print(prepare())"
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr
    made = Path(out.stdout.strip())
    assert made.parent == tmp_path and not made.exists()            # its own, removed at its exit
    assert not orphan.exists()
    assert live.exists() and unnamed.exists()
