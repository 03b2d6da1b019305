"""Stopping a run cleanly, and the test-only kill hook.

SIGTERM (what schedulers and spot-instance reclaimers send) and SIGINT (Ctrl-C) only set a flag; the
loop looks at it at the next optimizer-step boundary, writes a checkpoint there and raises `RunStopped`,
which the CLI turns into a one-line message with the exact resume command and exit status 128 + signal
(130 for SIGINT, 143 for SIGTERM). A second signal while the first is pending stops at once (Ctrl-C
twice). A signal during setup (tokenizing, loading) is acted on after the first step; one after the
last step lets the run finish its outputs. The same `RunStopped` ends a run whose loss or gradient
norm was non-finite too many steps in a row (exit status 3).

Signal handlers are process-wide, so the flag is module state: `handle_stop_signals` installs the
handlers for the duration of ``train()`` (main thread only; elsewhere nothing is installed) and puts
the previous ones back afterwards.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import threading
from pathlib import Path

NONFINITE_EXIT = 3  # exit status of a run stopped by non-finite losses (not a signal: 128 + n is taken)

_pending: list[int] = []  # signals received and not yet acted on


class RunStopped(Exception):
    """The run stopped early, leaving a resumable checkpoint. ``str(e)`` is the one-line message."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _on_signal(signum, frame) -> None:
    if _pending:  # the second Ctrl-C / SIGTERM: do not wait for the step boundary
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
    _pending.append(signum)


def handle_stop_signals(fn):
    """Decorator: SIGTERM/SIGINT set the stop flag while ``fn`` runs (see the module docstring)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        _pending.clear()
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return fn(*args, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _pending.clear()
    return wrapper


def resume_command(run_dir: Path) -> str:
    return f"fastsft train --resume {shlex.quote(str(run_dir))}"


def check_stop(*, step: int, nonfinite_in_a_row: int, max_nonfinite: int, run_dir: Path,
               save_checkpoint, agree=lambda votes: votes) -> None:
    """At an optimizer-step boundary: if a stop signal arrived, or the last ``max_nonfinite`` steps
    (0: never) were all skipped as non-finite, checkpoint via ``save_checkpoint(step) -> Path | None``
    (None: nothing usable to write) and raise `RunStopped`.

    ``agree`` sums a list of ints over the processes of a torchrun job: the ranks get a signal at
    different moments, and all of them must stop at the same boundary (the checkpoint is collective)."""
    nonfinite = max_nonfinite > 0 and nonfinite_in_a_row >= max_nonfinite
    votes = agree([int(signal.SIGINT in _pending), int(signal.SIGTERM in _pending)])
    signum = signal.SIGINT if votes[0] else signal.SIGTERM if votes[1] else None
    if signum is None and not nonfinite:
        return
    ckpt = save_checkpoint(step)
    where = f"checkpoint {ckpt}" if ckpt is not None else "no usable checkpoint was written"
    if signum is not None:
        raise RunStopped(f"stopped by {signum.name} after step {step}; {where}; "
                         f"resume with: {resume_command(run_dir)}", 128 + signum)
    raise RunStopped(f"stopped after step {step}: {nonfinite_in_a_row} optimizer steps in a row had a non-finite "
                     f"loss or gradient norm (train.max_nonfinite_steps={max_nonfinite}), so their updates were "
                     f"skipped; the weights are those before the first of them, in {where}. Lower train.lr, "
                     f"set train.max_grad_norm, use train.precision fp32 or check the data, then resume with: "
                     f"{resume_command(run_dir)}", NONFINITE_EXIT)


# ----------------------------------------------------------------------------------------------------
# test hook


def maybe_kill_for_test(where: str, step: int) -> None:
    """TEST HOOK, not a feature: ``FASTSFT_TEST_KILL_AT=<where>:<step>[:<signal>]`` sends this process
    SIGKILL (or the named signal, e.g. SIGTERM) when the run reaches that point, so tests can kill or
    interrupt a real ``fastsft train`` at an exact place. Points: ``step:N`` after optimizer step N (its
    checkpoint, if any, written), ``micro:N`` inside step N after its first micro-batch's backward,
    ``checkpoint:N`` inside the write of checkpoint N, before the rename that publishes it,
    ``outputs:N`` inside the write of the final adapter/model (after step N), before its rename. Unset
    (always, outside tests) it does nothing."""
    spec = os.environ.get("FASTSFT_TEST_KILL_AT")
    if not spec or not spec.startswith(f"{where}:{step}"):
        return
    rest = spec[len(f"{where}:{step}"):]
    if rest in ("", ":SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif rest.startswith(":") and not _pending:  # once: the handler acts at the next step boundary
        os.kill(os.getpid(), signal.Signals[rest[1:]])
