"""On a real one-node SLURM (``scripts/slurm_local.sh``): ``srun`` as the launcher, preemption
that loses no iteration, and a requeue that resumes exactly.

Phase 1 on the CPU (gloo), 2 ranks, generated data, 4 iterations, each job compared with the
session's uninterrupted ``torchrun`` run of the same schedule:

1. ``scripts/slurm/phase1_multinode.sbatch`` (sbatch options and ``EXTRA_ARGS`` shrink it to one
   node, 2 tasks, no GPU, the tiny run): ``srun`` launches the 2 ranks, no ``torchrun``; the final
   weights and the whole ``latest.pth`` are bit-identical to torchrun's.
2. a job submitted with :func:`utils.slurm.submit` (the sbatch command line the pipeline runner
   submits: ``--requeue``, ``--signal``, ``--open-mode=append``, the command as an ``srun`` step
   of 2 tasks); ``scancel --signal=USR1`` while iteration 1 runs (each task waits at the start of
   iteration 1 until its signal is there: ``hold_at_iter:1``). The job finishes iteration 1,
   saves ``latest.pth`` to continue from iteration 2 and requeues itself (``scontrol requeue``);
   the requeued job resumes at iteration 2 and finishes bit-identical, each iteration logged once.
3. ``scripts/slurm/phase1_1node_4gpu.sbatch`` (one ``srun`` task spawning the ranks with
   ``--dist``, here 2), the signal sent while rank 0 writes ``latest.pth`` (``hold_mid_write``: the
   write is held open until the signal is there). The write completes, the job stops after the
   next iteration, the ``--dist`` parent requeues it, and it finishes bit-identical.

SLURM delays a requeued job by about two minutes (``BeginTime``); the tests move its start to
now with ``scontrol update``. Where SLURM cannot start (packages missing, not root) the tests
skip, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.reliability.conftest import (
    Finished,
    assert_continued_exactly,
    finished,
    load_state,
    phase1_argv,
    signal_schedule,
)
from tests.reliability.runner import BASE_ENV, wait_until
from utils import slurm

pytestmark = pytest.mark.slow  # runs the scripts end to end under a launcher (tests/README.md)

JOB_TIMEOUT_S = 420
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]  # the environment of the SLURM commands and the jobs (SLURM_CONF)

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=False)

    def job(self, job_id: str) -> dict[str, str]:
        shown = self.run("scontrol", "show", "job", "-o", job_id)
        assert shown.returncode == 0, shown.stderr
        return dict(w.split("=", 1) for w in shown.stdout.split() if "=" in w)

    def wait_job(self, job_id: str, done: Callable[[dict[str, str]], bool], what: str, log: Path) -> dict[str, str]:
        """Until ``done(scontrol show job)``; fails at once if the job ended without it."""
        fields: dict[str, str] = {}

        def check() -> bool:
            fields.update(self.job(job_id))
            return done(fields)
        wait_until(check, f"job {job_id} {what}", JOB_TIMEOUT_S, failed=lambda: fields.get("JobState") in FINAL_STATES,
                   describe=lambda: f"{fields}\n--- {log} ---\n{log.read_text()[-6000:] if log.exists() else ''}",
                   interval=1.0)
        return dict(fields)


def local_slurm(action: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "slurm_local.sh"), action, str(folder)],
                          capture_output=True, text=True, timeout=120, check=False)


def start_local_slurm(folder: Path) -> Path:
    """``scripts/slurm_local.sh start``; skips the test when SLURM cannot start, fails it under CI."""
    started = local_slurm("start", folder)
    if started.returncode != 0:
        why = f"no local SLURM (scripts/slurm_local.sh start: {started.stderr.strip()[-2000:]})"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return Path(started.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = start_local_slurm(tmp_path_factory.mktemp("slurm"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DECOUPLENET_FAULT", "SLURM_"))}
    env.update(BASE_ENV, SLURM_CONF=str(folder / "slurm.conf"))
    yield Cluster(folder, env)
    local_slurm("stop", folder)


@dataclass
class Chain:
    """What one job went through."""

    run: Finished  # the snapshot folder, its compared checkpoints as digests
    log: Path
    job_id: str
    final: dict[str, str]  # scontrol show job at the end
    latest_at_stop: int | None = None  # latest.pth's iteration right after the stop, before the requeued run

    def text(self) -> str:
        return self.log.read_text()


def submit(cluster: Cluster, root: Path, name: str, command: list[str], tasks: int, fault: dict[str, str]) -> tuple:
    log = root / f"{name}.log"
    job = slurm.SbatchJob(command=command, job_name=name, log=str(log), tasks_per_node=tasks,
                          cpus_per_task=1 if tasks > 1 else 2, chdir=REPO)
    return slurm.submit(job, {**cluster.env, **fault}), log


def submit_template(cluster: Cluster, root: Path, name: str, tasks: int, extra: list[str],
                    fault: dict[str, str]) -> tuple[str, Path]:
    """sbatch ``scripts/slurm/<name>.sbatch`` shrunk to one node, ``tasks`` tasks, no GPU, 20 minutes;
    ``extra`` (the tiny run's flags) goes in through ``EXTRA_ARGS``."""
    log = root / f"{name}.log"
    argv = ["sbatch", "--parsable", "--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0",
            f"--cpus-per-task={2 // tasks}", "--time=20", f"--output={log}", f"--chdir={REPO}",
            os.path.join(REPO, "scripts", "slurm", f"{name}.sbatch")]
    env = {**cluster.env, **fault, "PYTHON": sys.executable, "SRC_ROOT": "unused", "TGT_ROOT": "unused",
           "EXTRA_ARGS": " ".join(map(str, extra))}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0], log


def requeued_run(cluster: Cluster, job_id: str, log: Path, snap: Path) -> tuple[int | None, dict[str, str]]:
    """After the stop: wait for the requeue, note latest.pth's iteration, start the job now, wait for its end."""
    cluster.wait_job(job_id, lambda f: f.get("JobState") == "PENDING" and f.get("Restarts") == "1",
                     "requeued (PENDING, Restarts=1)", log)
    latest = snap / "latest.pth"
    at_stop = int(load_state(latest)["iteration"]) if latest.exists() else None
    update = cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    assert update.returncode == 0, update.stderr
    final = cluster.wait_job(job_id, lambda f: f.get("JobState") in FINAL_STATES, "finished", log)
    return at_stop, final


@pytest.fixture(scope="module")
def jobs(request, cluster, synthetic_data, sourceonly_ckpt, tmp_path_factory) -> dict[str, Chain]:
    root = tmp_path_factory.mktemp("slurm_jobs")
    python = [sys.executable]

    def argv(name: str, *extra: str) -> list[str]:
        return [*python, *map(str, phase1_argv(synthetic_data, sourceonly_ckpt, root / name, *extra))]

    def plain() -> Chain:
        job_id, log = submit_template(cluster, root, "phase1_multinode", 2,
                                      argv("srun", *signal_schedule())[2:], {})
        final = cluster.wait_job(job_id, lambda f: f.get("JobState") in FINAL_STATES, "finished", log)
        return Chain(finished(root / "srun"), log, job_id, final)

    def usr1_mid_iteration() -> Chain:
        name = "srun_usr1"
        job_id, log = submit(cluster, root, name, argv(name, *signal_schedule(), "--resume_from", "auto"), 2,
                             {"DECOUPLENET_FAULT": "hold_at_iter:1"})
        wait_until(lambda: log.exists() and "iter =        0/" in log.read_text(), f"iteration 0 of job {job_id}",
                   JOB_TIMEOUT_S, describe=lambda: log.read_text()[-4000:] if log.exists() else "")
        sent = cluster.run("scancel", "--signal=USR1", job_id)
        assert sent.returncode == 0, sent.stderr
        at_stop, final = requeued_run(cluster, job_id, log, root / name)
        return Chain(finished(root / name), log, job_id, final, at_stop)

    def usr1_during_write() -> Chain:
        name = "dist_usr1_write"
        snap = root / name
        job_id, log = submit_template(cluster, root, "phase1_1node_4gpu", 1,
                                      [*argv(name, *signal_schedule(save_latest_every=2))[2:], "--gpus", "0,1"],
                                      {"DECOUPLENET_FAULT": "hold_mid_write:latest.pth"})
        wait_until(lambda: snap.is_dir() and any(p.name.startswith(".latest.pth.") for p in snap.iterdir()),
                   f"job {job_id} writing latest.pth", JOB_TIMEOUT_S,
                   describe=lambda: log.read_text()[-4000:] if log.exists() else "")
        sent = cluster.run("scancel", "--signal=USR1", job_id)
        assert sent.returncode == 0, sent.stderr
        at_stop, final = requeued_run(cluster, job_id, log, snap)
        return Chain(finished(snap), log, job_id, final, at_stop)

    chains = {"srun": plain, "srun_usr1": usr1_mid_iteration, "dist_usr1_write": usr1_during_write}
    with ThreadPoolExecutor(len(chains)) as pool:
        futures = {name: pool.submit(chain) for name, chain in chains.items()}
        request.getfixturevalue("two_rank_reference")  # runs meanwhile (unless another module made it)
        out = {name: f.result() for name, f in futures.items()}
    return out


def test_srun_without_torchrun_is_bit_identical_to_torchrun(jobs, two_rank_reference) -> None:
    chain = jobs["srun"]
    assert chain.final["JobState"] == "COMPLETED" and chain.final["ExitCode"] == "0:0", chain.final
    text = chain.text()
    assert "phase1: rank 0/2 on cpu, process group gloo, launcher srun" in text, text[-4000:]
    assert_continued_exactly(two_rank_reference, chain.run)


def test_usr1_mid_iteration_saves_that_iteration_requeues_and_resumes_exactly(jobs, two_rank_reference) -> None:
    chain = jobs["srun_usr1"]
    text = chain.text()
    assert chain.final["JobState"] == "COMPLETED" and chain.final["Restarts"] == "1", chain.final
    # Iteration 1 was running when the signal came: it is finished and saved, nothing after it.
    assert chain.latest_at_stop == 2, f"latest.pth at the stop: {chain.latest_at_stop}\n{text[-4000:]}"
    stopped = [ln for ln in text.splitlines() if ln.startswith("stopped on ")]
    assert len(stopped) == 1, text[-6000:]
    assert stopped[0].startswith("stopped on SIGUSR1: after iteration 1, ") and \
        f"requeued SLURM job {chain.job_id}, which continues with --resume_from auto" in stopped[0], stopped
    assert "resumed from" in text and "latest.pth at iteration 2" in text, text[-4000:]
    assert text.count("launcher srun") == 2, text[-4000:]  # the first run and the requeued one
    assert_continued_exactly(two_rank_reference, chain.run)


def test_usr1_during_a_latest_write_waits_for_it_then_requeues_and_resumes_exactly(jobs, two_rank_reference) -> None:
    chain = jobs["dist_usr1_write"]
    text = chain.text()
    assert chain.final["JobState"] == "COMPLETED" and chain.final["Restarts"] == "1", chain.final
    # The held write (after iteration 1, to continue at 2) was completed, not cut short; the
    # signal was seen in iteration 2, which was finished and saved.
    assert chain.latest_at_stop == 3, f"latest.pth at the stop: {chain.latest_at_stop}\n{text[-4000:]}"
    assert "launcher dist" in text, text[-4000:]
    stopped = [ln for ln in text.splitlines() if ln.startswith("stopped on ")]
    assert len(stopped) == 1 and stopped[0].startswith("stopped on SIGUSR1: after iteration 2, "), text[-6000:]
    assert f"requeued SLURM job {chain.job_id}" in stopped[0], stopped
    assert "latest.pth at iteration 3" in text, text[-4000:]
    assert_continued_exactly(two_rank_reference, chain.run)


def test_the_local_cluster_stops_cleanly(tmp_path) -> None:
    """``scripts/slurm_local.sh stop`` ends the daemons and removes the folder (a cluster of its own)."""
    folder = start_local_slurm(tmp_path / "c")
    pids = [int((folder / name).read_text()) for name in ("slurmctld.pid", "slurmd.pid", "munge/munged.pid")]
    stopped = local_slurm("stop", folder)
    assert stopped.returncode == 0, stopped.stderr
    assert not folder.exists()
    time.sleep(0.2)
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and
             Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == [], alive


# ---------------------------------------------------------------------------- the runner's chain
TINY_RECIPE = os.path.join(REPO, "tests", "data", "tiny_recipe.yaml")
CHAIN_TIMEOUT_S = 1200


def submit_chain(cluster: Cluster, out: Path, *extra: str) -> dict[str, str]:
    """``pipeline.py tests/data/tiny_recipe.yaml --launcher slurm``: its jobs by stage (slurm_jobs.json)."""
    import json

    done = subprocess.run([sys.executable, "pipeline.py", TINY_RECIPE, "--out", str(out), "--launcher", "slurm",
                           "--quiet", *extra], cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    jobs = json.loads((out / "slurm_jobs.json").read_text())
    assert list(jobs)[-1] == "report" and len(jobs) == 1 + 2 + 5 + 6  # report, data, backbone, 5 stages, 6 evals
    return jobs


def job_log(out: Path, key: str, job_id: str) -> Path:
    return out / "slurm" / f"{key.replace('/', '-')}-{job_id}.out"


def test_runner_chain_on_the_demo_recipe_finishes(cluster, tmp_path) -> None:
    """``pipeline.py --launcher slurm`` on the demo recipe at tiny sizes: every stage a job after the
    one before (afterok), each running the stage through ``pipeline.py --only``; all complete and
    the last job writes the report."""
    import json

    out = tmp_path / "chain"
    jobs = submit_chain(cluster, out, "--drop_states")  # passed on to every stage's job
    fields = {}

    def ended() -> bool:
        fields.update(cluster.job(jobs["report"]))
        return fields.get("JobState") in FINAL_STATES
    wait_until(ended, "the chain's report job", CHAIN_TIMEOUT_S,
               describe=lambda: "\n".join(f"{k}: {cluster.job(j).get('JobState')}" for k, j in jobs.items()))
    for key, job_id in jobs.items():
        state = cluster.job(job_id)
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (key, state,
                                                                                   job_log(out, key, job_id).read_text()[-3000:])
        if key != "report":
            assert json.loads((out / key / "pipeline_stage.json").read_text())["state"] == "finished", key
    assert cluster.job(jobs["seed_1234/soft_labels"])["Dependency"] in ("(null)", "")
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["phase2/final"]["n"] == 1
    assert "runs: python3 train_phase1.py" in job_log(out, "seed_1234/phase1", jobs["seed_1234/phase1"]).read_text()
    assert (out / "seed_1234" / "phase1" / "GTA5_4.pth").is_file() and not (out / "seed_1234" / "phase1" / "latest.pth").exists()


def test_runner_chain_stops_at_a_failed_stage(cluster, tmp_path) -> None:
    """Phase 1 made to fail (a --resume that does not exist): its job fails with the runner's one
    line in its log, and the jobs after it never run (cancelled by --kill-on-invalid-dep)."""
    out = tmp_path / "failing"
    jobs = submit_chain(cluster, out, "--set", f"phase1.resume={tmp_path / 'missing.pth'}")
    failed = cluster.wait_job(jobs["seed_1234/phase1"], lambda f: f.get("JobState") in FINAL_STATES,
                              "ended", job_log(out, "seed_1234/phase1", jobs["seed_1234/phase1"]))
    assert failed["JobState"] == "FAILED", failed
    log = job_log(out, "seed_1234/phase1", jobs["seed_1234/phase1"]).read_text()
    assert "error: seed_1234/phase1 failed with exit code 2" in log, log[-3000:]
    assert f"--resume {tmp_path / 'missing.pth'}: file not found" in log
    for key in ("seed_1234/soft_labels", "report"):
        cluster.wait_job(jobs[key], lambda f: f.get("JobState") in FINAL_STATES, "cancelled",
                         job_log(out, key, jobs[key]))
        assert cluster.job(jobs[key])["JobState"] == "CANCELLED"
    assert not (out / "seed_1234" / "soft_labels").exists()
    assert cluster.job(jobs["seed_1234/source_only"])["JobState"] == "COMPLETED"
