"""Keeping the judge server's processes accountable to each other.

LitServe runs the server as a main process with children: a multiprocessing manager and the API servers
(forked) and the inference workers (spawned). Two things are added here:
- every child dies with the main process, however that ends: on Linux the kernel sends it SIGKILL when its
  parent dies (`prctl(PR_SET_PDEATHSIG)`); elsewhere a thread notices that the parent pid changed. A
  SIGKILLed server otherwise leaves a worker behind that holds the model and the port's queue;
- `DeadlineBoard`: the deadline of the batch each worker is computing, in shared memory, so that `/health`
  (answered in an API process) can report a worker that is still busy past its deadline.
"""

from __future__ import annotations

import ctypes
import multiprocessing.sharedctypes
import multiprocessing.util
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(0)  # the parent is gone: nothing is left to clean up for

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid`, its parent, ends (at once, if it already has)."""
    tied = False
    if sys.platform.startswith("linux"):
        try:
            # SIGKILL: nothing a child is doing (a long C call, an ignored signal) can delay it.
            tied = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            tied = False
    if os.getppid() != parent_pid:  # the parent died before the tie was made
        os._exit(0)
    if not tied:
        _watch_parent(parent_pid)


class _ForkHook:
    """The object multiprocessing's after-fork registry holds (it keeps only a weak reference)."""

    def __call__(self, _self: object) -> None:
        die_with_parent(os.getppid())


_HOOK = _ForkHook()


def tie_forked_children() -> None:
    """Every process that multiprocessing forks from now on (LitServe's manager and API servers) ends
    with its parent. Spawned processes start afresh and call `die_with_parent` themselves."""
    global _TIED
    if not _TIED:  # once per process: several servers built in one process share the hook
        multiprocessing.util.register_after_fork(_HOOK, _HOOK)
        _TIED = True


_TIED = False


class DeadlineBoard:
    """One slot per inference worker: the deadline (`time.monotonic()`) of what it computes now, 0 when idle.

    Created in the main process before the workers start; they receive it with the LitAPI (spawned: as a
    process argument, the one way shared memory may be passed) and the API servers inherit it (forked).
    CLOCK_MONOTONIC is one clock for all processes of a machine, as LitServe's own queue timeouts assume.
    """

    def __init__(self, workers: int):
        self._slots = multiprocessing.sharedctypes.RawArray("d", max(1, workers))

    def slot(self) -> int:
        """This worker's slot: LitServe numbers its workers in LITSERVE_WORKER_ID."""
        return int(os.environ.get("LITSERVE_WORKER_ID", "0")) % len(self._slots)

    def busy(self, slot: int, deadline: float | None) -> None:
        self._slots[slot] = deadline if deadline is not None else float("inf")

    def idle(self, slot: int) -> None:
        self._slots[slot] = 0.0

    def overdue(self, grace: float = 1.0) -> bool:
        """Whether some worker is still computing more than `grace` seconds after its deadline."""
        now = time.monotonic()
        return any(0.0 < deadline < now - grace for deadline in self._slots)
