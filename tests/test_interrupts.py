"""SIGINT/SIGTERM handling: the one-line message, deferred journal writes, and resuming without loading."""

from __future__ import annotations

import os
import signal

import pytest

from medlens.interrupts import NOTHING_SAVED, Interrupted, deferred, install_handlers, on_interrupt


def test_sigterm_raises_interrupted_with_the_registered_message():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    install_handlers()
    try:
        with pytest.raises(Interrupted) as caught, on_interrupt(lambda: "3 of 9 saved"):
            os.kill(os.getpid(), signal.SIGTERM)
        assert caught.value.exit_code == 143 and caught.value.message == "3 of 9 saved"
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_a_signal_inside_deferred_waits_for_the_block():
    previous = signal.getsignal(signal.SIGINT)
    install_handlers()
    done = []
    try:
        with pytest.raises(Interrupted) as caught, deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append(True)  # reached: the signal is held until the block ends
        assert done == [True] and caught.value.exit_code == 130 and caught.value.message == NOTHING_SAVED
    finally:
        signal.signal(signal.SIGINT, previous)
