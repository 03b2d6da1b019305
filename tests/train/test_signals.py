"""SIGTERM/SIGINT: the run checkpoints at the next step boundary, prints one line with the exact
resume command and exits 128 + signal; resuming with that command ends where an uninterrupted run does."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from fastsft.train import signals


def stop_line(proc) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.startswith("fastsft train: stopped")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def run_resume_command(line: str):
    """Run the command the message prints, as a user pasting it would."""
    cmd = shlex.split(line.split("resume with: ", 1)[1])
    assert cmd[:3] == ["fastsft", "train", "--resume"]
    env = {k: v for k, v in os.environ.items() if k != "FASTSFT_TEST_KILL_AT"}
    return subprocess.run([sys.executable, "-m", "fastsft", *cmd[1:]], capture_output=True, text=True, env=env,
                          timeout=300)


def test_sigterm_mid_step_checkpoints_at_the_boundary_and_resumes_exactly(tmp_path, runs):
    run = tmp_path / "run"
    proc = runs.train(run, kill_at="micro:5:SIGTERM")  # arrives after step 5's first micro-batch
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    line = stop_line(proc)
    assert f"stopped by SIGTERM after step 5; checkpoint {run / 'checkpoints' / 'step-5'}" in line, line
    assert line.endswith(f"resume with: fastsft train --resume {run}"), line
    assert json.loads((run / "checkpoints" / "step-5" / "trainer_state.json").read_text())["step"] == 5

    resumed = run_resume_command(line)
    assert resumed.returncode == 0, resumed.stderr
    runs.assert_same_adapter(runs.reference(), run)


def test_sigint_exits_130_with_a_checkpoint(tmp_path, runs):
    run = tmp_path / "run"
    proc = runs.train(run, kill_at="step:2:SIGINT")  # Ctrl-C between steps, before any checkpoint
    assert proc.returncode == 130, proc.stderr
    line = stop_line(proc)
    assert "stopped by SIGINT after step 2" in line and f"--resume {run}" in line, line
    assert (run / "checkpoints" / "step-2" / "trainer_state.json").is_file()


def test_sigterm_from_outside(tmp_path, runs):
    """A real signal from another process at whatever point the run has reached."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastsft", "train", *runs.args, "--output.dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runs.env())
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and '"kind": "train"' in metrics.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = stop_line(subprocess.CompletedProcess(cmd, proc.returncode, "", err))
    step = int(line.split("after step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file(), line
    resumed = run_resume_command(line)
    assert resumed.returncode == 0, resumed.stderr
    runs.assert_same_adapter(runs.reference(), run)


# ----------------------------------------------------------------------------------------------------
# in-process: handlers installed only while training, a second signal stops at once


def test_handlers_are_installed_only_while_running():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    @signals.handle_stop_signals
    def fake_train():
        seen["term"] = signal.getsignal(signal.SIGTERM)
        seen["int"] = signal.getsignal(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # only sets the flag
        time.sleep(0.01)
        with pytest.raises(signals.RunStopped) as e:
            signals.check_stop(step=7, nonfinite_in_a_row=0, max_nonfinite=5, run_dir="out",
                               save_checkpoint=lambda step: f"out/checkpoints/step-{step}")
        assert e.value.exit_code == 143 and "resume with: fastsft train --resume out" in str(e.value)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the step boundary
            signals._on_signal(signal.SIGINT, None)
        return "done"

    assert fake_train() == "done"
    assert seen["term"] is signals._on_signal and seen["int"] is signals._on_signal
    assert signal.getsignal(signal.SIGTERM) is before
    signals.check_stop(step=1, nonfinite_in_a_row=0, max_nonfinite=5, run_dir="out",
                       save_checkpoint=lambda step: pytest.fail("no stop was requested"))
