"""Where the processes of one `mailgate serve` keep their Prometheus samples: prometheus_client's
multiprocess mode (a directory of memory-mapped files, one per process, summed at scrape time).

Why: routing and delivery run in worker processes (`[worker] processes`, 1 by default), and a counter
incremented there lived in that process only; the admin endpoint is served by the serve process, so
`mailgate_processed_total`, `mailgate_retries_total` and the processing and routing latency histograms
never moved. prometheus_client reads `PROMETHEUS_MULTIPROC_DIR` when it is first imported, so `prepare`
runs before anything imports it (`gateway.cli` calls it first thing for `serve`); the worker and helper
processes inherit the variable.

This module must not import prometheus_client (nor anything that does).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger(__name__)


def prepare() -> str | None:
    """Point this process (and its children) at a directory of their own; returns it, or None when it is
    too late (prometheus_client already imported: the samples then stay per process, as before).

    An operator-set `PROMETHEUS_MULTIPROC_DIR` is used and emptied of an earlier run's files (they would be
    summed in); otherwise a fresh temporary directory, removed at exit."""
    if "prometheus_client" in sys.modules:
        return None
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink(missing_ok=True)
        return str(path)
    _remove_orphans(Path(tempfile.gettempdir()))
    made = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    os.environ[ENV] = made
    atexit.register(shutil.rmtree, made, True)
    return made


_PREFIX = "mailgate-metrics-"


def _remove_orphans(tmp: Path) -> None:
    """Remove the directories of earlier `serve` processes that died without their atexit (SIGKILL, OOM
    killer, power loss): each holds a few MB of memory-mapped files, and a service that crash-loops would
    leave one per start. A directory is an orphan when the pid in its name is no longer running; one of a
    live `serve` (two gateways on one host) is left alone. Directories named without a pid (before this
    naming) are left too: nothing tells whose they are."""
    for path in tmp.glob(f"{_PREFIX}*-*"):
        pid_text = path.name[len(_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or not path.is_dir():
            continue
        if _running(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s: the metrics of a serve process (pid %s) that did not exit cleanly", path, pid_text)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    return True


def active() -> bool:
    """True when this process's samples go to the shared directory (`prepare` ran in serve's process)."""
    return bool(os.environ.get(ENV))
