"""Preemption: the first SIGTERM/SIGINT asks the loop to checkpoint and stop; a second aborts at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("maxtrain.checkpoint")

# Exit code of a run stopped by a signal after its checkpoint was committed. 75 is EX_TEMPFAIL
# from sysexits.h ("temporary failure, retry"): a scheduler or wrapper script can requeue on it,
# while 128+N (143, 130) would read as "killed by a signal" and 1/2 as a bug or a config error.
EXIT_PREEMPTED = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
    """Context manager; `requested` turns true on the first signal. Inert outside the main thread."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            # Second signal: the user (or the scheduler) wants out now. No cleanup that could
            # hang; an unfinished checkpoint stays a temporary dir that is ignored and removed later.
            print(f"maxtrain: second {name}: aborting without waiting for the checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested, self.signal_name = True, name
        log.warning("%s received: finishing this step, writing a checkpoint, then exiting (send again to abort now)", name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self, step: int, sync_every: int = 1) -> bool:
        """True when any process got a signal (all processes then stop at the same step).

        Several processes agree only at steps divisible by `sync_every`: the agreement is a
        host-blocking collective, so checking every step would stall every step's dispatch.
        """
        import jax

        if jax.process_count() == 1:
            return self.requested
        if step % sync_every:
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        # Every process must stop after the same step, or the collective save would hang.
        return bool(multihost_utils.process_allgather(np.array([self.requested], np.int32)).max())
