"""Requeue to first step: job start -> the first optimizer step after a resume, by part (issue 27, point 4).

``python tools/bench/requeue.py [--config configs/ticod_small.yaml] [--image-size 320x224] [--steps 2]
[--ranks 2] [--universal-ranks 1] [--repeats 2]``

Demo data (tools/make_demo_coco.py, 64 images) is sharded; ``ticod.train`` trains ``--config`` (default
TICOD-small, random init, the demo BPE tokenizer, fp32) for ``--steps`` steps under the ``deepspeed``
launcher with ``--ranks`` CPU ranks and ZeRO-2, saving a checkpoint at the last step. Then, each round,
the launcher is started again with ``--resume`` of that checkpoint, and the job is ended right after its
first optimizer step (``faults.kill_at_step``: the final save, export and evaluation are not part of a
requeue). The trainer writes when each start-up part ended (``ticod.startup``:
``RUN_DIR/startup/rank<r>.json``); the parts are read from rank 0, the job start is when this script
started the launcher:

launcher (its own start and spawning the ranks), imports (interpreter and imports of the rank), process
group, preflight/tokenizer/manifests, model build, engine (``deepspeed.initialize``), checkpoint load,
data loader (build), first batch (workers start, seek: ``seek_s`` of the stream's first batch, read,
decode), first step.

Side ``universal``: the same checkpoint resumed on ``--universal-ranks`` ranks: rank 0 first converts it
to DeepSpeed's universal form (removed before each round, so each round converts).
Timings of a shared CPU move with its load; the parts' shares are the numbers to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import ROOT, Report, Row, make_demo_data, run_in_own_group, workdir

from ticod.checkpoint import list_checkpoints

PARTS = (
    "launcher",
    "imports",
    "process group",
    "preflight, tokenizer, manifests",
    "model build",
    "engine",
    "checkpoint load",
    "data loader",
    "first batch",
    "first step",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_small_run_args(p)
    p.add_argument("--steps", type=int, default=2, help="steps trained before the checkpoint (N)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument(
        "--universal-ranks", type=int, default=1, help="world size of the universal side (0: none)"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--keep", default="", help="keep the data and run dirs here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per training job")
    p.add_argument("--out", default="bench_results/requeue.json")
    return p.parse_args(argv)


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(ranks: int, overrides: list[str], log: Path, timeout: int) -> tuple[float, int]:
    """Start ``ticod.train`` under the deepspeed launcher and wait for it; (job start time, exit status)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", _port(), "--module", "ticod.train"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.time()
    code = run_in_own_group([*cmd, *overrides], log=log, env=env, timeout=timeout)
    return start, code


def parts(job_start: float, startup: dict[str, Any]) -> dict[str, float]:
    """Seconds of each part (PARTS) from rank 0's startup record; ``seek`` and ``total`` too."""
    marks = startup["marks"]
    out = {"launcher": startup["process_start"] - job_start}
    before = startup["process_start"]
    for name in PARTS[1:]:
        out[name] = marks[name] - before
        before = marks[name]
    out["seek (in first batch)"] = float(startup.get("seek_s") or 0.0)
    out["total"] = marks["first step"] - job_start
    return out


def add_small_run_args(p: argparse.ArgumentParser) -> None:
    """The reduced CPU run's arguments (--config, --set, --image-size), read by :func:`small_run_args`."""
    p.add_argument("--config", default=str(ROOT / "configs" / "ticod_small.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra training overrides")
    p.add_argument("--image-size", default="320x224", metavar="WxH", help="long x short side")


def small_run_args(config: str, shards: Path, image_size: str) -> list[str]:
    """``ticod.train`` arguments of a reduced CPU run of ``config`` on demo shards: random init, batch 1,
    ZeRO-2, fp32, images at ``image_size`` (WxH), no evaluation, no wandb, a log line every step."""
    w, h = (int(v) for v in image_size.lower().split("x"))
    return [
        "--config",
        config,
        f"data.shards_dir={shards}",
        "data.tokenizer=''",
        "data.batch_size=1",
        "data.num_workers=1",
        f"data.train_min_sizes=[{min(w, h)}]",
        f"data.test_min_size={min(w, h)}",
        f"data.max_size={max(w, h)}",
        "model.backbone.pretrained=false",
        "model.backbone.checkpoint_path=''",
        "model.captioner.pretrained=false",
        "model.num_classes=6",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=fp32",
        "eval.at_start=false",
        "eval.at_end=false",
        "eval.every=0",
        "logging.wandb.mode=disabled",
        "logging.log_every=1",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report("requeue", torch.device("cpu"), vars(args))
    with workdir(args.keep) as tmp:
        _, shards = make_demo_data(tmp / "data", 64, per_shard=16)
        run = tmp / "run"
        common = [
            *small_run_args(args.config, shards, args.image_size),
            "checkpoint.keep_last=100",
            "optim.warmup_steps=1",
            *args.set,
        ]
        n = args.steps
        t = time.time()
        _, code = launch(
            args.ranks,
            [*common, f"run_dir={run}", f"max_steps={n}", f"checkpoint.save_every={n}"],
            tmp / "train.log",
            args.timeout,
        )
        ckpts = list_checkpoints(run)
        if code != 0 or not ckpts:
            raise SystemExit(f"training to the checkpoint failed (exit {code}): see {tmp / 'train.log'}")
        ckpt = ckpts[0]
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        print(f"checkpoint {ckpt} ({size / 2**20:.0f} MiB) after {time.time() - t:.0f} s")

        sides = {"same world size": args.ranks}
        if args.universal_ranks:
            sides["universal"] = args.universal_ranks
        results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for r in range(args.repeats):
            for side, ranks in sides.items():
                shutil.rmtree(ckpt / "universal", ignore_errors=True)
                shutil.rmtree(run / "startup", ignore_errors=True)
                resume = [f"run_dir={run}", f"max_steps={n + 5}", "checkpoint.save_every=0"]
                resume += [f"faults.kill_at_step={n + 1}", "faults.kill_rank=0", f"checkpoint.resume={ckpt}"]
                log = tmp / f"resume-{side.replace(' ', '_')}-{r}.log"
                start, code = launch(ranks, [*common, *resume], log, args.timeout)
                record = run / "startup" / "rank0.json"
                if not record.is_file():
                    raise SystemExit(f"{side}: no first step (exit {code}): see {log}")
                results[side].append(parts(start, json.loads(record.read_text())))
                print("    " + ", ".join(f"{k} {v:.1f}" for k, v in results[side][-1].items()))
                print(
                    f"  round {r + 1}/{args.repeats} {side} ({ranks} ranks): {results[side][-1]['total']:.1f} s"
                )

        names = [*PARTS, "seek (in first batch)", "total"]
        for side, ranks in sides.items():
            rows = [Row(name, [x[name] for x in results[side]], "s") for name in names]
            total = rows[-1].median
            for row in rows[:-1]:
                row.note = f"{row.median / total:.0%}"
            report.table(f"job start -> first step after a resume, {side} ({ranks} CPU ranks)", rows)
        report.extra.update(checkpoint_mib=size / 2**20, results=results)
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
