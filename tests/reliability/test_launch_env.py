"""Which launcher a process runs under, the GPUs it asks for, and the stop-signal handler.

* :func:`utils.distributed.launcher` on the environments SLURM and torchrun give (the batch
  script's and an ``srun`` step's, as printed by SLURM 22.05 on a one-node cluster): torchrun
  first, then an ``srun`` step of several tasks, then ``--dist``; a half-set or mixed environment
  is one error naming the variable. :mod:`utils.slurm`: the first host of a node list, the job's
  port, the sbatch command line of a job.
* :func:`utils.distributed.check_devices`: GPUs asked for (no ``--cpu``) where torch sees none, or
  fewer than asked for, are refused.
* the real scripts (slow): the refusal, and a half-set environment, as one line, exit code 2,
  nothing written.
* :mod:`utils.signals` in a process of its own: signals within ``SAME_REQUEST_S`` are one request,
  a later one ends the process.

That ``srun`` really launches, stops and requeues is tests/reliability/test_slurm.py, on SLURM.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.reliability.conftest import phase1_argv
from tests.reliability.runner import BASE_ENV, one_error_line
from utils import distributed as du
from utils import slurm

# What SLURM 22.05 sets in a batch script of `sbatch --ntasks=2` and in the tasks of `srun` there.
BATCH = {"SLURM_JOB_ID": "41", "SLURM_JOBID": "41", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost"}
STEP = {**BATCH, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
ONE_TASK_STEP = {**BATCH, "SLURM_STEP_ID": "1", "SLURM_STEPID": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}
TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def options(dist: bool = False, gpus: tuple[int, ...] = (0, 1), cpu: bool = False) -> types.SimpleNamespace:
    return types.SimpleNamespace(dist=dist, gpus=list(gpus), cpu=cpu)


@pytest.mark.parametrize("env, dist, expected", [
    ({}, False, "single"),
    ({}, True, "dist"),
    (BATCH, True, "dist"),  # `python3 train_phase1.py --gpus 0,1,2,3 --dist` in the batch script itself
    (BATCH, False, "single"),
    (ONE_TASK_STEP, True, "dist"),  # `srun --ntasks=1 python3 ... --dist` (the one-node job scripts)
    (STEP, False, "srun"),
    (TORCHRUN, False, "torchrun"),
    ({**STEP, **TORCHRUN}, False, "torchrun"),  # `srun torchrun ...`
    ({**STEP, **TORCHRUN}, True, "torchrun"),  # torchrun ignores --dist, as before
])
def test_launcher_precedence(env, dist, expected) -> None:
    assert du.launcher(options(dist), env) == expected


def test_an_srun_task_is_one_rank_of_the_step() -> None:
    task = slurm.srun_task(STEP)
    assert (task.rank, task.world_size, task.local_rank) == (1, 2, 1)
    assert task.init_method == f"tcp://localhost:{slurm.PORT_BASE + 41}"
    assert slurm.srun_task({**STEP, "MASTER_PORT": "23456", "MASTER_ADDR": "10.0.0.7"}).init_method == \
        "tcp://10.0.0.7:23456"
    multi = {**STEP, "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert slurm.srun_task(multi).init_method == f"tcp://gpu07:{slurm.PORT_BASE + 123456 % slurm.PORT_SPAN}"
    assert slurm.srun_task(BATCH) is None and slurm.srun_task(ONE_TASK_STEP) is None and slurm.srun_task({}) is None


@pytest.mark.parametrize("env, dist, needle", [
    ({"RANK": "0"}, False, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, False, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, False, "RANK=2, WORLD_SIZE=2"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, False, "RANK='one': not an integer"),
    ({**STEP, "RANK": "0", "WORLD_SIZE": "1"}, False, "RANK and WORLD_SIZE are set, but not by torchrun"),
    (STEP, True, "--dist: this process is one of 2 tasks of an srun step"),
    ({k: v for k, v in STEP.items() if k != "SLURM_LOCALID"}, False, "SLURM_LOCALID: not set"),
    ({k: v for k, v in STEP.items() if k != "SLURM_PROCID"}, False, "SLURM_PROCID: not set"),
    ({**STEP, "SLURM_NTASKS": "4"}, False, "SLURM_NTASKS=4 but the srun step has SLURM_STEP_NUM_TASKS=2"),
    ({**STEP, "SLURM_PROCID": "2"}, False, "SLURM_PROCID=2: must be below SLURM_NTASKS=2"),
    ({**STEP, "SLURM_STEP_NUM_TASKS": "x"}, False, "SLURM_STEP_NUM_TASKS='x': not an integer"),
    ({k: v for k, v in STEP.items() if "NODELIST" not in k}, False, "SLURM_JOB_NODELIST: not set"),
    ({k: v for k, v in STEP.items() if not k.startswith("SLURM_JOB")}, False, "SLURM_JOB_ID: not set"),
    ({**STEP, "MASTER_PORT": "70000"}, False, "MASTER_PORT=70000: not a TCP port"),
])
def test_half_set_or_mixed_environment_names_the_variable(env, dist, needle) -> None:
    with pytest.raises((du.LaunchError, slurm.SlurmError), match=None) as caught:
        du.launcher(options(dist), env)
    assert needle in str(caught.value), str(caught.value)


@pytest.mark.parametrize("nodelist, first", [
    ("localhost", "localhost"), ("gpu[03-05,9],cpu1", "gpu03"), ("gpu[9,03-05]", "gpu9"),
    ("rack[1-2]-n[01-04]", "rack1-n01"), ("a1,b[2-3]", "a1"), (" node-7 ", "node-7"),
])
def test_first_host_of_a_node_list(nodelist, first) -> None:
    assert slurm.first_host(nodelist) == first


def test_job_port_stays_below_the_ephemeral_ports() -> None:
    ports = {slurm.job_port(j) for j in range(0, 200000, 7)}
    assert min(ports) >= 1024 and max(ports) < 32768 and len(ports) > 1000


def test_sbatch_command_of_a_requeue_safe_chained_job() -> None:
    job = slurm.SbatchJob(command=["python3", "train_phase2.py", "--snapshot-dir", "snap dir", "--resume_from", "auto"],
                          job_name="phase2", log="logs/%j.log", dependency="1234", nodes=2, tasks_per_node=4,
                          gpus_per_node=4, cpus_per_task=8, time="24:00:00", extra=["--partition=gpu"])
    argv = slurm.sbatch_command(job)
    assert argv[:2] == ["sbatch", "--parsable"]
    for option in ("--job-name=phase2", "--output=logs/%j.log", "--open-mode=append", "--requeue",
                   "--signal=USR1@120", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
                   "--time=24:00:00", "--dependency=afterok:1234", "--kill-on-invalid-dep=yes", "--partition=gpu"):
        assert option in argv, (option, argv)
    wrapped = shlex.split(argv[argv.index("--wrap") + 1])
    assert wrapped == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=8", "python3", "train_phase2.py",
                       "--snapshot-dir", "snap dir", "--resume_from", "auto"], wrapped
    one = slurm.sbatch_command(slurm.SbatchJob(["python3", "x.py", "--dist"], "x", "x.log", requeue=False))
    assert "--no-requeue" in one and "--dependency" not in " ".join(one)
    assert shlex.split(one[one.index("--wrap") + 1])[:2] == ["srun", "--ntasks=1"]


# ---------------------------------------------------------------------------- GPUs asked for
def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("count, kind, opts, env, needle", [
    (2, "dist", options(True, (0, 1, 2, 3)), {}, "--gpus 0,1,2,3 --dist: asks for 4 GPUs, torch sees 2"),
    (2, "single", options(False, (3,)), {}, "--gpus 3: no GPU 3; torch sees 2 (ids 0..1"),
    (2, "dist", options(True, (1, 2)), {}, "--gpus 1,2: no GPU 2; torch sees 2"),
    (2, "torchrun", options(), {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2"}, "LOCAL_RANK=2: torch sees 2 GPU"),
    (2, "srun", options(), {**STEP, "SLURM_LOCALID": "3"}, "SLURM_LOCALID=3: torch sees 2 GPUs"),
    (0, "single", options(), {}, "--gpus 0,1 without --cpu asks for a GPU, but torch sees no GPU ("),
    (0, "dist", options(True, (0, 1, 2, 3)), {}, "--gpus 0,1,2,3 --dist without --cpu asks for a GPU"),
    (0, "torchrun", options(), TORCHRUN, "no --cpu: this torchrun worker asks for a GPU, but torch sees no GPU"),
    (0, "srun", options(), STEP, "no --cpu: this srun task asks for a GPU"),
])
def test_gpus_asked_for_and_not_there_are_refused(monkeypatch, count, kind, opts, env, needle) -> None:
    fake_gpus(monkeypatch, count)
    with pytest.raises(du.LaunchError) as caught:
        du.check_devices(opts, kind, env)
    assert needle in str(caught.value), str(caught.value)
    if count == 0:
        assert str(caught.value).endswith("; --cpu trains on the CPU"), str(caught.value)


@pytest.mark.parametrize("count, kind, opts, env", [
    (4, "dist", options(True, (0, 1, 2, 3)), {}),
    (1, "single", options(False, (0, 1)), {}),  # without --dist only the first entry is used (the original's)
    (1, "srun", options(), {**STEP, "SLURM_LOCALID": "3"}),  # --gpus-per-task=1: each task sees its own GPU
    (0, "dist", options(True, (0, 1, 2, 3), cpu=True), {}),
])
def test_gpus_that_are_there_or_cpu_pass(monkeypatch, count, kind, opts, env) -> None:
    fake_gpus(monkeypatch, count)
    du.check_devices(opts, kind, env)


def test_the_reason_names_a_hiding_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch: that is the reason given")
    assert du.no_gpu_reason() == "CUDA_VISIBLE_DEVICES='' hides every GPU"


# ---------------------------------------------------------------------------- the scripts
@pytest.mark.slow
@pytest.mark.parametrize("extra, env, needles", [
    ([], {"CUDA_VISIBLE_DEVICES": ""}, ["--gpus 0,1 without --cpu asks for a GPU, but torch sees no GPU",
                                        "CUDA_VISIBLE_DEVICES='' hides every GPU", "--cpu trains on the CPU"]),
    (["--gpus", "0,1,2,3", "--dist"], {"CUDA_VISIBLE_DEVICES": ""}, ["--gpus 0,1,2,3 --dist without --cpu"]),
    (["--gpus", "0"], {}, ["torch sees no GPU (", "--cpu trains on the CPU"]),
])
def test_asking_for_gpus_torch_does_not_see_is_one_line(scripts, synthetic_data, sourceonly_ckpt, tmp_path, extra,
                                                         env, needles) -> None:
    if not env and du.cuda_usable():
        pytest.skip("this machine has a GPU")
    argv = [a for a in phase1_argv(synthetic_data, sourceonly_ckpt, tmp_path / "snap", *extra) if a != "--cpu"]
    line = one_error_line(scripts.run(argv, env=env, expect=None), *needles)
    assert line.startswith("error: "), line
    assert not (tmp_path / "snap").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({k: v for k, v in STEP.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID: not set"),
])
def test_a_half_set_environment_is_one_line(scripts, synthetic_data, sourceonly_ckpt, tmp_path, env, needle) -> None:
    result = scripts.run(phase1_argv(synthetic_data, sourceonly_ckpt, tmp_path / "snap"), env=env, expect=None)
    one_error_line(result, needle)
    assert not (tmp_path / "snap").exists()


# ---------------------------------------------------------------------------- the handler
_HANDLER_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from utils import signals
signals.install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR1)  # within SAME_REQUEST_S: the same request delivered again
time.sleep(0.1)
print(signals.requested(), signals.received(), flush=True)
if os.fork() == 0:  # a forked child (a DataLoader worker) ignores them, whenever they come
    time.sleep(signals.SAME_REQUEST_S + 0.2)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    os._exit(7)
print("child", os.waitstatus_to_exitcode(os.wait()[1]), flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # later: a second request ends the process
time.sleep(5)
print("still alive", flush=True)
"""


def test_one_request_may_arrive_twice_a_second_one_ends_the_process() -> None:
    done = subprocess.run([sys.executable, "-c", _HANDLER_SCRIPT.format(repo=REPO)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **BASE_ENV}, check=False)
    assert done.stdout.splitlines() == ["SIGTERM 2", "child 7"], done.stdout + done.stderr
    assert done.returncode == -15, done.stdout + done.stderr


# ---------------------------------------------------------------------------- the job scripts
TEMPLATES = sorted((Path(REPO) / "scripts" / "slurm").glob("*.sbatch"))
STAGE_OF = {"train_phase1.py": "phase1", "train_phase2.py": "phase2", "generate_soft_label.py": "soft_label"}


def template_commands(text: str) -> list[list[str]]:
    """The project commands a job script runs (``srun ... SCRIPT.py FLAGS``), variables replaced
    by placeholders, ``${EXTRA_ARGS:-}`` left out."""
    joined = text.replace("\\\n", " ").replace("${EXTRA_ARGS:-}", "")
    joined = re.sub(r'"\$\{?\w+(:-[^}]*)?\}?"', "VALUE", joined)
    return [shlex.split(line) for line in joined.splitlines()
            if line.lstrip().startswith("srun") and any(f" {script} " in line for script in STAGE_OF)]


def test_there_are_job_scripts_for_the_papers_runs() -> None:
    assert {p.name for p in TEMPLATES} >= {"phase1_1node_4gpu.sbatch", "phase1_multinode.sbatch",
                                           "soft_labels_1node_4gpu.sbatch", "phase2_1node_4gpu.sbatch"}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_job_scripts_are_requeue_safe_and_their_commands_parse(path: Path) -> None:
    """``--signal=USR1@...`` (to the job steps: no ``B:``), ``--requeue``, ``--open-mode=append``; the
    project's command runs as an srun step, with the flag that continues it; its flags parse."""
    from stages.options import parse_args

    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    options = [ln.split(None, 1)[1].strip() for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    assert "--requeue" in options and "--open-mode=append" in options, options
    assert any(re.fullmatch(r"--signal=USR1@\d+", o) for o in options), options
    commands = template_commands(text)
    assert len(commands) == 1, commands
    words = commands[0]
    script = next(w for w in words if w in STAGE_OF)
    flags = words[words.index(script) + 1:]
    args = parse_args(STAGE_OF[script], "", flags)
    multinode = "multinode" in path.name
    assert args.dist != multinode and ("--ntasks=1" in words) != multinode, words
    if STAGE_OF[script] != "soft_label":
        assert args.resume_from == "auto", words
