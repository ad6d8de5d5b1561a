"""SIGTERM / SIGUSR1 through the real launchers: stop at an iteration boundary, save, exit with
code 3 and one line saying how to continue; the printed command continues bit-identically.

Phase 1 on the CPU, generated data, 4 iterations (tests/reliability/conftest.py). Each run that
is signalled waits at the start of iteration 1 until its signal is there (``hold_at_iter:1``),
so the signal is known to arrive while iteration 1 runs:

1. ``torchrun``, 2 workers, SIGTERM to the torchrun agent (which passes it on to its workers):
   every worker finishes iteration 1, the one ``latest.pth`` holds both ranks' state to continue
   from iteration 2, the workers exit within torchrun's grace period; rank 0's line gives the
   torchrun command with ``--resume_from auto``, which finishes bit-identical to an uninterrupted
   2-rank run, each iteration logged once;
2. ``--dist``, 2 spawned ranks, SIGTERM to the parent only (it passes it on): the same, exit code 3;
3. one process, a second SIGTERM while the stop's ``latest.pth`` is being written (the write is
   held open, ``hold_mid_write``): the process ends at once, the previous complete ``latest.pth``
   stays, and ``--resume_from auto`` finishes bit-identical to an uninterrupted run;
4. ``generate_soft_label.py``, SIGUSR1 while its second file is written: that file is completed,
   the run stops (exit code 3) with one line, and its command with ``--skip_existing`` writes the
   rest, every file identical to an uninterrupted run's.

The SLURM side (``srun``, ``scancel --signal``, requeue) is tests/reliability/test_slurm.py.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import IMG_H, IMG_W, assert_same_state, target_train_basenames
from tests.reliability.conftest import (
    SIGNAL_STEPS,
    TORCHRUN_2,
    assert_continued_exactly,
    finished,
    load_state,
    metrics_lines,
    phase1_argv,
    signal_schedule,
)
from tests.reliability.runner import Watched, temp_files, wait_until
from utils.signals import EXIT_STOPPED, SAME_REQUEST_S

pytestmark = pytest.mark.slow  # runs the scripts end to end under launchers (tests/README.md)

HOLD = {"DECOUPLENET_FAULT": "hold_at_iter:1"}
ITER0 = "iter =        0/"  # rank 0's log line of iteration 0 (before iteration 1 starts)


def stop_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("stopped on ")]
    assert len(lines) == 1, f"expected one 'stopped on' line:\n{stderr[-6000:]}"
    return lines[0]


def continue_command(line: str) -> list[str]:
    assert "; continue with: " in line, line
    return shlex.split(line.split("; continue with: ", 1)[1])


@pytest.fixture(scope="module")
def launched(request, synthetic_data, sourceonly_ckpt, tmp_path_factory) -> dict:
    """The torchrun and --dist runs, each signalled during iteration 1, then continued with the
    command each printed; run side by side while the 2-rank reference is made."""
    root = tmp_path_factory.mktemp("signals")
    common = [*signal_schedule(), "--resume_from", "auto"]
    runs = {
        "torchrun": Watched([*TORCHRUN_2, *phase1_argv(synthetic_data, sourceonly_ckpt, root / "torchrun", *common)],
                            env=HOLD),
        "dist": Watched([sys.executable, *phase1_argv(synthetic_data, sourceonly_ckpt, root / "dist", *common,
                                                      "--dist", "--gpus", "0,1")], env=HOLD),
    }
    request.getfixturevalue("two_rank_reference")
    out = {}
    for name, proc in runs.items():
        proc.wait_for(ITER0)
        proc.proc.send_signal(signal.SIGTERM)  # the torchrun agent / the --dist parent only
        start = time.monotonic()
        stopped = proc.wait()
        seconds = time.monotonic() - start
        latest = load_state(root / name / "latest.pth")
        at_stop = {"iteration": latest["iteration"], "world_size": latest["world_size"],
                   "ranks": [r["rank"] for r in latest["ranks"]]}
        command = continue_command(stop_line(stopped.stderr))
        continued = Watched(command).wait()
        out[name] = {"stopped": stopped, "seconds": seconds, "at_stop": at_stop, "command": command,
                     "continued": continued, "finished": finished(root / name)}
    return out


@pytest.mark.parametrize("name", ["torchrun", "dist"])
def test_sigterm_stops_every_rank_after_the_running_iteration(name, launched) -> None:
    run = launched[name]
    stopped = run["stopped"]
    if name == "dist":
        assert stopped.returncode == EXIT_STOPPED, stopped.describe()
    else:  # torchrun re-raises the signal it got after its workers ended; they did so by themselves
        assert "Unable to shutdown process" not in stopped.stderr and "forcefully" not in stopped.stderr, \
            stopped.describe()
    assert run["at_stop"] == {"iteration": 2, "world_size": 2, "ranks": [0, 1]}, run["at_stop"]
    line = stop_line(stopped.stderr)
    assert line.startswith("stopped on SIGTERM: after iteration 1, "), line
    assert "Traceback" not in stopped.stdout, stopped.describe()
    assert "stop requested: stopping after iteration 1" in stopped.stdout, stopped.describe()


@pytest.mark.parametrize("name", ["torchrun", "dist"])
def test_the_printed_command_continues_bit_identically(name, launched, two_rank_reference) -> None:
    run = launched[name]
    command, original = run["command"], run["stopped"].args
    assert command[-2:] == ["--resume_from", "auto"] and command.count("--resume_from") == 1, command
    assert command[:-2] == [a for a in original if a not in ("--resume_from", "auto")], command
    continued = run["continued"]
    assert continued.returncode == 0, continued.describe()
    assert "latest.pth at iteration 2" in continued.stdout, continued.describe()
    assert_continued_exactly(two_rank_reference, run["finished"])


# ---------------------------------------------------------------------------- one process
def test_second_signal_during_the_stop_save_keeps_the_previous_latest(scripts, synthetic_data, sourceonly_ckpt,
                                                                       tmp_path) -> None:
    """First SIGTERM: the run stops after iteration 2 and writes ``latest.pth``; a second SIGTERM
    while that write is held open ends the process at once (as without signal handling): the
    ``latest.pth`` of iteration 1's periodic save stays, complete, and the half-done write is only
    a temporary file. ``--resume_from auto`` then finishes bit-identical to an uninterrupted run."""
    schedule = [*signal_schedule(save_latest_every=2, batch=1), "--resume_from", "auto"]
    ref_snap, snap = tmp_path / "reference", tmp_path / "signalled"
    ref = scripts.start(phase1_argv(synthetic_data, sourceonly_ckpt, ref_snap, *schedule))
    job = scripts.start(phase1_argv(synthetic_data, sourceonly_ckpt, snap, *schedule),
                        env={"DECOUPLENET_FAULT": "hold_mid_write:latest.pth:2"})
    wait_until(lambda: "iter =        1/" in scripts.output(job), "iteration 1", 300, describe=lambda: scripts.output(job))
    first = time.monotonic()
    scripts.signal(job, signal.SIGTERM)
    wait_until(lambda: (snap / "latest.pth").exists() and temp_files(snap) != [], "the held write of latest.pth", 300,
               describe=lambda: scripts.output(job))
    time.sleep(max(0.0, first + SAME_REQUEST_S + 0.5 - time.monotonic()))  # a second request, not the same one again
    scripts.signal(job, signal.SIGTERM)
    killed = scripts.wait(job)
    assert killed.returncode == -signal.SIGTERM, killed.describe()
    assert metrics_lines(snap) == [0, 1, 2], killed.describe()  # stopped after iteration 2, in the stop's save
    assert load_state(snap / "latest.pth")["iteration"] == 2, "the previous complete latest.pth is gone"
    assert len(temp_files(snap)) == 1, temp_files(snap)

    continued = scripts.run(phase1_argv(synthetic_data, sourceonly_ckpt, snap, *schedule))
    assert "latest.pth at iteration 2" in continued.stdout and "removed stale temporary file" in continued.stdout
    assert scripts.wait(ref).returncode == 0
    name = f"GTA5_{SIGNAL_STEPS}.pth"
    assert_same_state(load_state(ref_snap / name), load_state(snap / name), name)
    la, lb = load_state(ref_snap / "latest.pth"), load_state(snap / "latest.pth")
    for key in la:
        if key != "args":
            assert_same_state(la[key], lb[key], f"latest.pth/{key}")
    assert metrics_lines(snap) == [0, 1, 2, 2, 3]  # iteration 2 was not saved: done again
    assert temp_files(snap) == []


def test_soft_labels_stop_on_usr1_and_continue_with_skip_existing(scripts, synthetic_data, sourceonly_ckpt,
                                                                  tmp_path) -> None:
    def argv(out: Path) -> list:
        return ["generate_soft_label.py", "--cpu", "--quiet", "--tgt_rootpath", synthetic_data["cityscapes"],
                "--tgt_img_size", f"{IMG_W},{IMG_H}", "--resume", sourceonly_ckpt, "--output_folder", out,
                "--snapshot-dir", tmp_path / f"snap_{out.name}", "--num-workers", "0", "--batch_size_val", "1"]

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    ref = scripts.start(argv(whole))
    job = scripts.start(argv(stopped), env={"DECOUPLENET_FAULT": "hold_mid_write:*.npy:2"})
    # The first file is in place and the second one's temporary file there: the held write.
    wait_until(lambda: stopped.is_dir() and len(list(stopped.glob("*.npy"))) == 1 and temp_files(stopped) != [],
               "the second soft label's write", 300, describe=lambda: scripts.output(job))
    scripts.signal(job, signal.SIGUSR1)
    result = scripts.wait(job)
    assert result.returncode == EXIT_STOPPED, result.describe()
    names = sorted(f"{n}.npy" for n in target_train_basenames(synthetic_data))
    line = stop_line(result.stderr)
    assert line.startswith(f"stopped on SIGUSR1: 2 of {len(names)} soft labels are in {stopped}"), line
    assert [ln for ln in result.stderr.splitlines() if ln.strip()] == [line], result.describe()
    assert temp_files(stopped) == [] and len(list(stopped.glob("*.npy"))) == 2  # the held write was completed
    command = continue_command(line)
    assert command[-1] == "--skip_existing" and command[1:-1] == [str(a) for a in argv(stopped)], command
    continued = scripts.run(command[1:])
    assert f"2 of {len(names)} soft labels already there" in continued.stdout, continued.describe()
    assert scripts.wait(ref).returncode == 0
    assert sorted(p.name for p in stopped.iterdir()) == names
    for name in names:
        assert (whole / name).read_bytes() == (stopped / name).read_bytes(), name
