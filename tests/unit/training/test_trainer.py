"""Trainer pieces that need no engine (the whole run is tested with real ranks in tests/distributed)."""
from __future__ import annotations

import os
import signal

from relbert_ds.training.trainer import _StopFlag


def test_the_stop_flag_catches_preemption_signals_and_gives_the_handlers_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    flag = _StopFlag()
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@... warning
        assert flag.raised
    finally:
        flag.uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # a later SIGTERM stops the caller again
