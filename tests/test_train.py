"""End-to-end training runs of the tiny demo model: one process, and 2 CPU ranks under deepspeed."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ticod import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK"}
LAUNCHER_VARS |= {"MASTER_ADDR", "MASTER_PORT"}
# Small and quick: the demo model on the test shards, a few steps.
FAST = [
    "data.batch_size=2",
    "data.num_workers=1",
    "optim.warmup_steps=1",
    "logging.log_every=1",
    "eval.at_end=false",
    "checkpoint.save_every=0",
]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_train(overrides: list[str], *, nproc: int = 1, env: dict | None = None, timeout: int = 600):
    """Run ``ticod.train`` as users do: alone, or under the deepspeed launcher with CPU ranks."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "ticod.train"]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", _port(), "--module", "ticod.train"]
    cmd += ["--config", str(DEMO), *FAST, *overrides]
    # The child must not inherit a launcher from this process (a torchrun/Slurm test session).
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    full_env = {**inherited, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return run_killing_group(cmd, env=full_env, timeout=timeout)


def run_killing_group(cmd: list[str], *, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session whose whole process group is SIGKILLed on timeout.

    Plain ``run`` kills only the launcher: its ranks and their data workers would outlive the test.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # also what the launcher left behind after it exited
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_log(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in train_log(run_dir)}


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_single_process_trains_checkpoints_exports(demo_shards_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_train(
        [f"run_dir={run}", f"data.shards_dir={demo_shards_dir}", "max_steps=3", "deepspeed.zero_stage=0"]
    )
    ok(proc)
    rows = train_log(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("train/loss", "train/loss_det", "train/loss_cap", "train/caption", "train/stage2_box"):
            assert math.isfinite(r[k]), (k, r)
        assert r["train/images_per_s"] > 0 and r["train/lr"] > 0
    assert [p.name for p in ck.list_checkpoints(run)] == [ck.checkpoint_name(3)]
    assert (run / "export" / "model.safetensors").is_file()
    assert (run / "config.yaml").is_file() and (run / "tokenizer").is_dir()

    from ticod.export import load_for_inference

    bundle = load_for_inference(run)
    assert not bundle.model.training and len(bundle.categories) == bundle.cfg.model.num_classes


def test_config_error_exits_with_message(tmp_path):
    proc = run_train([f"run_dir={tmp_path}", "optim.lr=fast"])
    assert proc.returncode == 2
    assert "config key 'optim.lr'" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_zero_stages_two_ranks(demo_shards_dir, tmp_path, stage, precision):
    run = tmp_path / "run"
    proc = run_train(
        [
            f"run_dir={run}",
            f"data.shards_dir={demo_shards_dir}",
            "max_steps=3",
            f"deepspeed.zero_stage={stage}",
            f"deepspeed.precision={precision}",
        ],
        nproc=2,
    )
    ok(proc)
    rows = train_log(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_after_kill_is_exact(demo_shards_dir, tmp_path):
    """2 ranks, ZeRO-2: kill a rank after step 4, resume from the step-3 checkpoint, compare losses."""
    common = [
        f"data.shards_dir={demo_shards_dir}",
        "max_steps=6",
        "deepspeed.zero_stage=2",
        "checkpoint.save_every=3",
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ok(run_train([f"run_dir={ref}", *common], nproc=2))

    killed = run_train([f"run_dir={cut}", *common, "faults.kill_at_step=4", "faults.kill_rank=1"], nproc=2)
    assert killed.returncode != 0
    assert [p.name for p in ck.list_checkpoints(cut)] == [ck.checkpoint_name(3)]
    ok(run_train([f"run_dir={cut}", *common, "--resume", "auto"], nproc=2))

    expected, got = losses_by_step(ref), losses_by_step(cut)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    # Steps 4..6 were logged twice in the cut run (before the kill and after the resume): the
    # jsonl keeps the latest, i.e. the resumed run's values. CPU + gloo: bit-exact.
    for step in range(1, 7):
        assert got[step] == expected[step], (step, got[step], expected[step])
