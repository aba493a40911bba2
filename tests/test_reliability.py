"""Issue 7: bad data, non-finite losses, interrupted checkpoints, hangs and secrets, end to end.

The run tests drive ``python -m ticod.train`` the way users do (tests/test_train.py's ``run_train``), on
tiny shards made here; the security tests check the source and the shard reader. Proven elsewhere:

- resume after SIGKILL of one of 2 ranks is exact step for step (losses, weights, trainer state; the
  resumed run does only the remaining steps): tests/test_train.py::test_resume_after_kill_is_exact; the
  pieces it relies on: RNG and optimizer/LR state (tests/test_checkpoint.py::test_deepspeed_roundtrip),
  stream position and counts (tests/test_data_pipeline.py::test_train_stream_is_seeded_per_rank_and_resumable,
  tests/test_data_bad.py::test_resumed_train_stream_counts_what_the_uninterrupted_one_counts);
- every bad-sample reason at loader level, no ``.pkl`` member unpickled: tests/test_data_bad.py;
- ``latest`` skips ``.tmp-``/unmarked dirs, keep-last never prunes the newest: tests/test_checkpoint.py;
- uneven eval shares across 2 ranks (different batch counts per rank) give the metrics of one rank:
  tests/test_evaluate.py::test_world_size_one_and_two_give_identical_metrics (here: the same inside a
  2-rank training run, with the real val loader).
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import (
    DEMO,
    FAST,
    ROOT,
    assert_same_weights,
    launch_module,
    losses_by_step,
    ok,
    process_group,
    run_train,
    shard_samples,
    tar_bytes,
    train_env,
    train_log,
    trainer_state,
    write_split,
)
from safetensors.torch import load_file

from ticod import checkpoint as ck
from ticod.config import ConfigError, load_config
from ticod.data.eval_stream import build_eval_loader
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import build_train_loader
from ticod.engine import consolidated_state_dict
from ticod.preemption import REQUEUE_EXIT_CODE

# A fake wandb key: 40 hex characters like a real one, searched for in every file and output of a run.
FAKE_WANDB_KEY = hashlib.sha1(b"ticod-test-fake-wandb-key").hexdigest()


# ------------------------------------------------------------------------------------------ helpers
def all_files(*roots: Path) -> list[Path]:
    return sorted(p for r in roots if r.exists() for p in r.rglob("*") if p.is_file() and not p.is_symlink())


def by_prefix(row: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix)}


# Per pass over the odd shard: 5 usable samples (one with 1 degenerate + 2 outside boxes dropped, one
# with no objects, one with a 5000-word caption) and 5 bad ones, one per reason below.
ODD_SHARD_BAD = ("bad_jpeg", "missing_json", "bad_json", "bad_annotation", "missing_jpeg")
ODD_SHARD_DROPPED = {"degenerate_box": 1, "box_outside_image": 2}


@pytest.fixture(scope="module")
def bad_shards(demo_shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of damaged data with the demo categories, val split and tokenizer.

    Split ``train``: the odd shard (10 samples, see ODD_SHARD_BAD), a shard truncated inside its second of
    3 samples and a garbage file posing as a 3-sample shard. Split ``ceiling``: the odd shard and a garbage
    file posing as 40 samples (with the seeded draws, MIN_SAMPLES_FOR_BAD_RATIO=100 samples are read
    before the first batch).
    """
    out = tmp_path_factory.mktemp("bad_train_shards")
    for p in demo_shards_dir.glob("val-*"):
        shutil.copy(p, out / p.name)
    shutil.copytree(demo_shards_dir / "tokenizer", out / "tokenizer")
    categories = json.loads((demo_shards_dir / "train-manifest.json").read_text())["categories"]
    samples = shard_samples(demo_shards_dir / "train-000000.tar")
    (jpg, rec), (jpg2, rec2) = [s for s in samples if s[1]["boxes"]][:2]
    w, h = rec["width"], rec["height"]

    def record(key: int, base: dict = rec, **changes) -> bytes:
        return json.dumps({**base, "image_id": key, **changes}).encode()

    boxes = [[5, 5, 0, 10], [w + 5, 5, 20, 20], [-40, h + 1, 30, 30], [4, 4, w / 2, h / 2]]
    odd = [
        ("000000000001.jpg", jpg), ("000000000001.json", record(1)),
        ("000000000002.jpg", jpg[:200] + b"\x00garbage" * 40), ("000000000002.json", record(2)),
        ("000000000003.jpg", jpg),  # no json
        ("000000000004.jpg", jpg), ("000000000004.json", b'{"image_id": 4, "boxes": [[1, 2'),
        ("000000000005.jpg", jpg),
        ("000000000005.json", record(5, boxes=boxes, category_ids=[1, 3, 7, 8], iscrowd=[0] * 4, areas=[1.0] * 4)),
        ("000000000006.jpg", jpg), ("000000000006.json", record(6, boxes=[], category_ids=[], iscrowd=[], areas=[])),
        ("000000000007.jpg", jpg), ("000000000007.json", record(7, captions=[" ".join(["word"] * 5000)])),
        ("000000000008.jpg", jpg), ("000000000008.json", record(8, category_ids=[999] * len(rec["boxes"]))),
        ("000000000009.jpg", jpg2), ("000000000009.json", record(9, rec2)),
        ("000000000010.json", record(10)),  # no jpg
    ]  # fmt: skip
    (out / "odd-000000.tar").write_bytes(tar_bytes(odd))
    three = tar_bytes(
        [(f"00000000002{i}.{e}", d) for i in range(3) for e, d in (("jpg", jpg), ("json", record(20)))]
    )
    with tarfile.open(fileobj=io.BytesIO(three)) as tar:
        cut = tar.getmembers()[2].offset_data + 100  # inside the second sample's JPEG
    (out / "truncated-000000.tar").write_bytes(three[:cut])
    (out / "garbage-000000.tar").write_bytes(b"not a tar archive " * 200)
    write_split(
        out,
        "train",
        [("odd-000000.tar", 10), ("truncated-000000.tar", 3), ("garbage-000000.tar", 3)],
        categories,
    )
    write_split(out, "ceiling", [("odd-000000.tar", 10), ("garbage-000000.tar", 40)], categories)
    return out


# ------------------------------------------------------------------------------- bad data + wandb
BAD_RUN_STEPS = 7
BAD_RUN = [
    f"max_steps={BAD_RUN_STEPS}",
    "max_bad_fraction=1.0",
    "data.shuffle_buffer=4",
    "deepspeed.zero_stage=0",
    "seed=1",  # with these draws the 7 batches meet every kind of damage (checked in the test)
]


@pytest.fixture(scope="module")
def bad_data_run(bad_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """7 steps on the damaged train split with the ceiling off, wandb offline, a fake key in the env."""
    root = tmp_path_factory.mktemp("bad_data_run")
    run, wandb_home = root / "run", root / "wandb_home"
    env = {
        "WANDB_API_KEY": FAKE_WANDB_KEY,
        # wandb's own config/cache/staging dirs go where the test can search them (not ~).
        "WANDB_CONFIG_DIR": str(wandb_home / "config"),
        "WANDB_CACHE_DIR": str(wandb_home / "cache"),
        "WANDB_DATA_DIR": str(wandb_home / "data"),
        "WANDB_ARTIFACT_DIR": str(wandb_home / "artifacts"),
    }
    overrides = [f"run_dir={run}", f"data.shards_dir={bad_shards}", *BAD_RUN]
    wandb = ["logging.wandb.mode=offline", "logging.wandb.project=ticod-test"]
    return run, wandb_home, run_train([*overrides, *wandb], env=env), overrides


def expected_counts(overrides: list[str]) -> list[dict[str, Any]]:
    """Run totals after each of the first BAD_RUN_STEPS batches, from the train loader alone (same seed).

    num_workers=0 gives the same stream as the run's single worker (both are worker 0 of 1).
    """
    cfg = load_config(DEMO, [*FAST, *overrides, "data.num_workers=0"])
    tok = load_tokenizer(Path(cfg.data.shards_dir) / "tokenizer")
    loader = build_train_loader(cfg.data, tok, rank=0, world_size=1, seed=cfg.seed)
    bad, dropped, ids, out = Counter(), Counter(), [], []
    for batch in itertools.islice(loader, BAD_RUN_STEPS):
        bad.update(batch.stats["bad"])
        dropped.update(batch.stats["fixed"])
        ids += [m["image_id"] for m in batch.meta]
        out.append({"bad": dict(bad), "dropped": dict(dropped), "samples": len(ids), "ids": set(ids)})
    return out


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """History rows of the offline wandb run, read back from its ``.wandb`` file.

    wandb 0.31 ships no Python reader: the file is a 7-byte header, then LevelDB log records (32 KiB
    blocks; each chunk has a 7-byte header: crc32, length, type 1=full, 2=first, 3=middle, 4=last) holding
    ``Record`` protobufs.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


def test_bad_samples_are_skipped_counted_by_reason_and_logged(bad_data_run) -> None:
    """Training keeps going over every kind of bad sample; counts by reason reach jsonl, console and wandb."""
    run, _, proc, overrides = bad_data_run
    ok(proc)
    rows = train_log(run)
    assert [r["step"] for r in rows] == list(range(1, BAD_RUN_STEPS + 1))
    assert all(math.isfinite(r["train/loss"]) and r["train/nonfinite_skipped"] == 0 for r in rows)

    # The trainer's totals equal what its loader reported, batch for batch (sizes shrink by the bad ones).
    expected = expected_counts(overrides)
    for r, e in zip(rows, expected, strict=True):
        assert by_prefix(r, "train/bad/") == e["bad"] and by_prefix(r, "train/boxes_dropped/") == e["dropped"]
        assert r["train/bad_samples"] == sum(e["bad"].values()) and r["train/samples"] == e["samples"]
    # By the last step (seeded draws) every kind of damage was met: each per-sample reason of the odd
    # shard, the truncated shard (2 lost per pick) and the garbage one (3 per pick).
    last = expected[-1]
    assert set(last["bad"]) == {*ODD_SHARD_BAD, "truncated_shard", "unreadable_shard"}, last
    assert last["bad"]["truncated_shard"] % 2 == 0 and last["bad"]["unreadable_shard"] % 3 == 0
    picks = last["dropped"]["degenerate_box"]
    assert last["dropped"] == {k: n * picks for k, n in ODD_SHARD_DROPPED.items()}
    assert last["samples"] < 2 * BAD_RUN_STEPS  # some batches lost bad samples and ran smaller
    # ... and it trained on the odd-but-usable samples: dropped boxes, no objects, 5000-word caption.
    assert {5, 6, 7} <= last["ids"] <= {1, 5, 6, 7, 9, 20}

    # Console (stderr: log lines, no terminal): the totals by reason and a warning per skipped sample.
    final = rows[-1]
    for reason, n in last["bad"].items():
        assert f"train/bad/{reason}={n}" in proc.stderr
    assert re.search(r"skipping sample 000000000004 from \S+odd-000000.tar: bad_json", proc.stderr)

    # wandb got the same rows (read back from the offline run file).
    history = [h for h in wandb_history(run) if "train/loss" in h]
    assert [h["step"] for h in history] == [r["step"] for r in rows]
    for prefix in ("train/bad", "train/boxes_dropped/"):
        assert by_prefix(history[-1], prefix) == by_prefix(final, prefix)


def test_wandb_key_is_never_written_or_printed(bad_data_run) -> None:
    """The key in the environment of a wandb run appears in no file of the run, wandb's dirs or the output."""
    run, wandb_home, proc, _ = bad_data_run
    ok(proc)
    files = all_files(run, wandb_home)
    # The run really wrote what could leak: config, logs, checkpoint, export, wandb's offline run.
    names = {p.name for p in files}
    assert {"config.yaml", "train_log.jsonl", "trainer_state.json", "model.safetensors"} <= names
    assert any(p.suffix == ".wandb" for p in files) and any(p.name.startswith("debug") for p in files)
    needles = [FAKE_WANDB_KEY.encode(), FAKE_WANDB_KEY[:12].encode(), FAKE_WANDB_KEY[-12:].encode()]
    leaks = [str(p) for p in files for n in needles if n in p.read_bytes()]
    assert not leaks, leaks
    for stream in (proc.stdout, proc.stderr):
        assert not any(n.decode() in stream for n in needles)


def test_bad_sample_ceiling_stops_the_run_with_counts_by_reason(bad_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_train(
        [
            f"run_dir={run}",
            f"data.shards_dir={bad_shards}",
            "data.train_split=ceiling",
            "data.shuffle_buffer=4",
            "max_steps=20",
            "max_bad_fraction=0.05",
            "deepspeed.zero_stage=0",
        ]
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    msg = re.search(
        r"training stopped: (\d+) of (\d+) samples read were bad .*max_bad_fraction=5\.00%.*by reason: (\{.*\})",
        proc.stderr,
    )
    assert msg, proc.stderr[-3000:]
    bad, read = int(msg[1]), int(msg[2])
    by_reason = ast.literal_eval(msg[3])
    assert by_reason["unreadable_shard"] % 40 == 0 and by_reason["unreadable_shard"] >= 40
    assert sum(by_reason.values()) == bad and read >= 100 and bad > 0.05 * read
    rows = train_log(run)
    assert rows and rows[-1]["train/bad_samples"] == bad and rows[-1]["step"] < 20
    assert not (run / "export").exists()


# --------------------------------------------------------------------------------- non-finite loss
NAN_COMMON = ["max_steps=4", "deepspeed.zero_stage=2", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def one_nan_run(demo_shards_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """NaN on the 2nd micro-batch only; checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("one_nan") / "run"
    proc = run_train(
        [
            f"run_dir={run}",
            f"data.shards_dir={demo_shards_dir}",
            *NAN_COMMON,
            "checkpoint.save_every=2",
            "faults.nan_loss_at_steps=[2]",
        ]
    )
    return run, proc


def test_one_nan_is_skipped_and_counted_and_weights_stay_finite(one_nan_run) -> None:
    run, proc = one_nan_run
    ok(proc)
    rows = train_log(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/nonfinite_skipped"] for r in rows] == [0, 1, 1, 1]
    assert rows[-1]["train/samples"] == 8  # the skipped micro-batch trained nothing
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in rows)
    assert "non-finite loss at step 1 (skipped; 1 in a row)" in proc.stderr
    weights = load_file(run / "export" / "model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_nonfinite_in_a_row_stops_with_the_checkpoint_from_before_the_fault(
    one_nan_run, demo_shards_dir: Path, tmp_path: Path
) -> None:
    """Same run, then 3 NaNs in a row (max_nonfinite=3) while attempting step 3: exit 3, pre-fault weights."""
    ref, _ = one_nan_run
    run = tmp_path / "run"
    proc = run_train(
        [
            f"run_dir={run}",
            f"data.shards_dir={demo_shards_dir}",
            *NAN_COMMON,
            "faults.nan_loss_at_steps=[2,4,5,6]",
            "max_nonfinite=3",
        ]
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    saved = run / ck.CKPT_DIR / ck.checkpoint_name(2)
    assert (
        f"training stopped: 3 consecutive non-finite losses (max_nonfinite=3); weights from before the fault saved in {saved}"
        in proc.stderr
    )
    assert ck.list_checkpoints(run) == [saved]  # save_every=0: written by the stop itself
    state = json.loads((saved / ck.STATE_FILE).read_text())["train"]
    assert (state["step"], state["nonfinite"], state["batches"]) == (2, 4, 6)
    assert [r["step"] for r in train_log(run)] == [1, 2]
    # Bit-identical to the weights the uninterrupted run had after step 2.
    expected = consolidated_state_dict(ref / ck.CKPT_DIR / ck.checkpoint_name(2))
    got = consolidated_state_dict(saved)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
        assert torch.isfinite(got[k]).all(), k


# --------------------------------------------------------------------- interrupted save, 2 ranks
# ticod.train with one rank SIGKILLed right after DeepSpeed wrote its part of one checkpoint: the moment
# when DeepSpeed's own `latest` tag would already name the checkpoint but our publish has not happened.
KILL_IN_SAVE = """
import os, signal, sys

from ticod import checkpoint, train

STEP, RANK = int(os.environ["KILL_IN_SAVE_STEP"]), int(os.environ["KILL_IN_SAVE_RANK"])
_save = checkpoint.Checkpointer.save


def save(self, engine, step, trainer_state):
    if step == STEP and int(os.environ["RANK"]) == RANK:
        deepspeed_save = engine.save_checkpoint

        def save_then_die(*args, **kwargs):
            deepspeed_save(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        engine.save_checkpoint = save_then_die
    return _save(self, engine, step, trainer_state)


checkpoint.Checkpointer.save = save
if __name__ == "__main__":
    sys.exit(train.main())
"""


@pytest.mark.slow
def test_checkpoint_interrupted_by_a_killed_rank_is_never_resumed_from(demo_shards_dir: Path, tmp_path: Path):
    """Rank 1 dies inside the step-4 save; --resume auto continues from step 2, exactly, to the end.

    keep_last=1: the half-written step-4 checkpoint never displaces step 2, the only good one.
    The resumed run also evaluates with 2 ranks on uneven shares (5 and 3 val images, 3 and 2 batches).
    """
    (tmp_path / "ticod_kill_in_save.py").write_text(KILL_IN_SAVE)
    run = tmp_path / "run"
    common = [
        f"run_dir={run}",
        f"data.shards_dir={demo_shards_dir}",
        "max_steps=4",
        "deepspeed.zero_stage=2",
        "checkpoint.save_every=2",
        "checkpoint.keep_last=1",
        "checkpoint.async_save=false",  # DeepSpeed writes its files in the save (background: test_async_checkpoint_faults)
    ]
    env = {"PYTHONPATH": str(tmp_path), "KILL_IN_SAVE_STEP": "4", "KILL_IN_SAVE_RANK": "1"}
    killed = launch_module("ticod_kill_in_save", common, env=env)
    assert killed.returncode != 0
    first = losses_by_step(run)
    assert sorted(first) == [1, 2, 3, 4]
    ckpts = run / ck.CKPT_DIR
    partial = ckpts / f"{ck.TMP_PREFIX}{ck.checkpoint_name(4)}"
    assert any(partial.glob("*optim_states.pt")), "DeepSpeed had written its files"
    assert not (partial / ck.STATE_FILE).exists()
    assert ck.list_checkpoints(run) == [ckpts / ck.checkpoint_name(2)]
    assert not (ckpts / "latest").exists()  # DeepSpeed's tag file, written before all ranks finish: unused

    resumed = run_train([*common, "--resume", "auto", "eval.at_end=true", "data.eval_batch_size=2"], nproc=2)
    ok(resumed)
    assert f"resumed from {ckpts / ck.checkpoint_name(2)} at step 2" in resumed.stderr
    # The leftover tmp dir was replaced and published; step 2 pruned (keep_last=1).
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [ck.checkpoint_name(4)]
    again = losses_by_step(run)
    assert [again[s] for s in (3, 4)] == [first[3], first[4]]  # CPU + gloo: bit-exact
    metrics = json.loads((run / "eval" / ck.checkpoint_name(4) / "metrics.json").read_text())
    assert metrics["num_images"] == 8 and metrics["world_size"] == 2


# ---------------------------------------------------------------------- non-finite loss, one rank
# ticod.train with the loss of one rank's N-th training micro-batch made NaN (faults.nan_loss_at_steps
# faults every rank alike).
NAN_ON_ONE_RANK = """
import os, sys

from ticod import train
from ticod.models import TICOD

RANK, MICRO_BATCH = int(os.environ["NAN_RANK"]), int(os.environ["NAN_MICRO_BATCH"])
_forward = TICOD.forward
calls = 0


def forward(self, *args, **kwargs):
    global calls
    out = _forward(self, *args, **kwargs)
    if self.training and int(os.environ["RANK"]) == RANK:
        calls += 1
        if calls == MICRO_BATCH:
            out["loss"] = out["loss"] * float("nan")
    return out


TICOD.forward = forward
if __name__ == "__main__":
    sys.exit(train.main())
"""


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_every_rank(demo_shards_dir: Path, tmp_path: Path) -> None:
    """2 ranks, ZeRO-2, NaN loss on rank 1's 2nd micro-batch only: both ranks skip that micro-batch (rank 0
    must not train on its own), keep the same step count and end with the weights, losses and trainer
    state of a run in which every rank had the NaN there.
    """
    (tmp_path / "ticod_nan_on_one_rank.py").write_text(NAN_ON_ONE_RANK)
    # A short collective timeout: ranks that disagree fail fast instead of waiting out the default.
    common = [f"data.shards_dir={demo_shards_dir}", "max_steps=3", "deepspeed.zero_stage=2"]
    common.append("deepspeed.dist_timeout_s=60")
    one, every = tmp_path / "one", tmp_path / "every"
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "NAN_RANK": "1", "NAN_MICRO_BATCH": "2"}
    proc = launch_module("ticod_nan_on_one_rank", [f"run_dir={one}", *common], env=env)
    ok(proc)
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING non-finite loss at step 1 (skipped; 1 in a row)" in proc.stderr
    rows = train_log(one)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/nonfinite_skipped"] for r in rows] == [0, 1, 1]

    ok(run_train([f"run_dir={every}", *common, "faults.nan_loss_at_steps=[2]"], nproc=2))
    assert losses_by_step(one) == losses_by_step(every)
    state = trainer_state(one, 3)
    assert state == trainer_state(every, 3)
    assert (state["step"], state["batches"], state["nonfinite"], state["samples"]) == (3, 4, 1, 3 * 2 * 2)
    assert_same_weights(every / "export" / "model.safetensors", one / "export" / "model.safetensors")


# ------------------------------------------------------------------------------------- preemption
@pytest.mark.serial  # times the save: not beside other runs (pytest-xdist)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_to_every_process_saves_and_exits_for_requeue(
    sig: signal.Signals, demo_shards_dir: Path, tmp_path: Path
) -> None:
    """The signal reaches the trainer and its data worker at once, as Slurm signals a whole job step (and
    the deepspeed launcher its process tree): checkpoint of the current step, exit 75, well within 30 s.
    """
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ticod.train", "--config", str(DEMO), *FAST]
    cmd += [f"run_dir={run}", f"data.shards_dir={demo_shards_dir}", "max_steps=500", "deepspeed.zero_stage=2"]
    # Its own session: the signal goes to the trainer's process group only, not to pytest.
    with process_group(cmd, env=train_env()) as proc:
        log = run / "train_log.jsonl"
        deadline = time.monotonic() + 300
        while not (log.is_file() and log.read_text().strip()) and proc.poll() is None:
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, sig)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    assert took < 30, took  # the launcher's (and Slurm's default KillWait) grace before SIGKILL
    (saved,) = ck.list_checkpoints(run)
    assert f"{sig.name} received: checkpoint {saved} saved, exiting for requeue" in stderr
    state = json.loads((saved / ck.STATE_FILE).read_text())["train"]
    assert state["step"] == train_log(run)[-1]["step"] >= 1
    assert not list((run / ck.CKPT_DIR).glob(f"{ck.TMP_PREFIX}*"))


# ------------------------------------------------------------------------------------------- hang
@pytest.mark.slow
def test_a_hung_rank_fails_the_job_within_the_distributed_timeout(demo_shards_dir: Path, tmp_path: Path):
    timeout_s = 20
    proc = run_train(
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.shards_dir={demo_shards_dir}",
            "max_steps=3",
            "deepspeed.zero_stage=2",
            "faults.hang_at_step=1",
            "faults.kill_rank=1",
            f"deepspeed.dist_timeout_s={timeout_s}",
        ],
        nproc=2,
        timeout=timeout_s + 400,
    )
    ended = datetime.datetime.now()
    assert proc.returncode != 0
    hung = re.search(
        r"(\d\d:\d\d:\d\d) \[rank1\] WARNING fault injection: rank 1 stops responding", proc.stderr
    )
    assert hung, proc.stderr[-3000:]
    hung_at = datetime.datetime.combine(ended.date(), datetime.time.fromisoformat(hung[1]))
    waited = (ended - hung_at).total_seconds() % 86400
    # The healthy rank waited out the timeout in its next collective, then failed; the launcher then
    # stopped the hung one (within its 30 s SIGTERM -> SIGKILL grace).
    assert timeout_s - 2 <= waited < timeout_s + 60, (waited, proc.stderr[-3000:])
    assert f"Timed out waiting {timeout_s * 1000}ms" in proc.stderr  # gloo, with the configured timeout


# --------------------------------------------------------------------------------------- security
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_source_loads_only_safe_formats() -> None:
    """Static check of ticod/ and tools/: weights_only torch.load, no pickle, safe YAML, no tar extraction."""
    sources = sorted([*(ROOT / "ticod").rglob("*.py"), *(ROOT / "tools").rglob("*.py")])
    assert len(sources) > 20
    problems, torch_loads = [], 0
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in {"pickle", "cPickle", "dill", "marshal", "shelve"} for n in names):
                    problems.append(f"{where}:{node.lineno} imports a pickle-like module")
        for node, func in _calls(tree):
            if func.endswith("torch.load"):
                torch_loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                ):
                    problems.append(f"{where}:{node.lineno} {ast.unparse(node)} without weights_only=True")
            if func in {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"}:
                problems.append(f"{where}:{node.lineno} {func}")
            if func.endswith((".extractall", ".extract")):
                problems.append(f"{where}:{node.lineno} {func} writes archive members to disk")
    assert torch_loads >= 2  # the scan sees the real calls (checkpoint RNG files, stage-0 weights)
    assert not problems, problems


def test_yaml_config_tags_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\nmax_steps: 5\n')
    with pytest.raises((ConfigError, yaml.YAMLError), match="python/object/apply"):
        load_config(evil)
    assert not marker.exists()
    (tmp_path / "plain.yaml").write_text("seed: 7\n")
    assert load_config(tmp_path / "plain.yaml").seed == 7  # the same loader reads ordinary YAML


def test_shard_reader_never_writes_archive_paths(
    demo_shards_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members named ../x, /abs/x, symlinks and hard links are read (or skipped) in memory, never written."""
    shards, work, secret = tmp_path / "shards", tmp_path / "work" / "a" / "b", tmp_path / "secret.jpg"
    shards.mkdir()
    work.mkdir(parents=True)
    secret.write_bytes(b"secret bytes")
    (jpg, rec), *_ = shard_samples(demo_shards_dir / "val-000000.tar")
    record = json.dumps(rec).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("../../escaped.jpg", jpg)
        add("../../escaped.json", record)
        add(str(tmp_path / "absolute.jpg"), jpg)
        add(str(tmp_path / "absolute.json"), record)
        add("000000000003.jpg", kind=tarfile.SYMTYPE, link=str(secret))
        add("000000000003.json", record)
        add("000000000004.jpg", kind=tarfile.LNKTYPE, link="../../escaped.jpg")
        add("000000000004.json", record)
    (shards / "evil-000000.tar").write_bytes(buf.getvalue())
    categories = json.loads((demo_shards_dir / "val-manifest.json").read_text())["categories"]
    write_split(shards, "evil", [("evil-000000.tar", 4)], categories)
    before = {p: p.read_bytes() for p in all_files(tmp_path)}

    monkeypatch.chdir(work)  # relative member paths would land under tmp_path
    cfg = load_config(
        overrides=[f"data.shards_dir={shards}", "data.num_workers=0", "data.eval_batch_size=4"]
    ).data
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    batches = list(build_eval_loader(cfg, tok, rank=0, world_size=1, split="evil"))
    assert {p: p.read_bytes() for p in all_files(tmp_path)} == before  # nothing written, nothing changed
    keys = [m["key"] for b in batches for m in b.meta]
    assert keys == ["../../escaped", str(tmp_path / "absolute")]  # regular members: decoded in memory only
    bad = {}
    for b in batches:
        for reason, n in b.stats["bad"].items():
            bad[reason] = bad.get(reason, 0) + n
    assert bad == {"missing_jpeg": 2}  # link members are never followed


def test_resume_flag_and_overrides_mix_in_any_order() -> None:
    """`--resume auto` may sit between key=value overrides, as restart scripts append it."""
    from ticod.train import parse_args

    argv = ["--config", "c.yaml", "max_steps=9", "--resume", "auto", "seed=3"]
    assert parse_args(argv) == ("c.yaml", ["max_steps=9", "seed=3", "checkpoint.resume=auto"])
