"""Child processes that do not outlive the process that started them.

Linux's `prctl(PR_SET_PDEATHSIG)` asks the kernel to signal a child when its parent dies (the
parent *thread*: start children from the thread that lives as long as the process). Used by
`make run` for its services, by the worker for isolated runners and shell commands: work whose
owner died must stop, or it would run on unwatched while the failover rule hands it to others.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


_PRCTL = _libc_prctl()
"""Looked up once, here: a child between fork and exec should do as little as it can."""


def die_with_parent(signum: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` for a child: `signum` when this process dies, or exit at once if it died
    already (between the fork and this call). None where the kernel cannot do it."""
    if _PRCTL is None:
        return None
    prctl = _PRCTL
    parent = os.getpid()

    def arrange() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # died before the line above: nobody would tell us
            os._exit(1)

    return arrange
