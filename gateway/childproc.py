"""Child processes of `mailgate serve` (workers, the spool writer) must not outlive it."""

from __future__ import annotations

import os
import signal


def die_with_parent() -> None:
    """Linux: get SIGTERM when the serve process dies (even by SIGKILL), so no orphan keeps running."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
