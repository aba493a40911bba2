"""Time to the first training batch after a resume, by how far the stream had gone (issue 14, point 3).

``python tools/bench/resume.py [--positions 0,10000,1000000] [--repeats 3]``

The 80 real COCO images of ``--coco`` are sharded into 4 shards of 20 (small shards, so a long stream
resamples them many times). Each measurement is a fresh Python process that builds the training loader of
``--config`` (default ``configs/ticod_large.yaml``'s data settings: aspect grouping, its shuffle buffer)
with ``start_batch`` set so that the stream had drawn ``position`` samples, and takes one batch: the time
from the process's start (the parent's spawn) to that batch. The positions alternate round by round.

Sides:

* ``seek @ N``: manifest format 2 (byte offsets): the resumed worker computes its position from the draws
  and reads only what the shuffle buffer and the grouping hold there.
* ``replay @ N`` (``--replay-positions``): the same shards with the offsets taken out of the manifest
  (format 1, written before offsets existed): the worker re-reads every sample drawn before N.

Target: seek at 10^6 samples ≤ 1.2 × seek at 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, Report, Row, Target, add_coco_arg, add_common_args, alternate, setup, workdir

TARGET = 1.2  # first batch at 10^6 samples drawn / at 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/resume.json")
    p.set_defaults(config=str(ROOT / "configs" / "ticod_large.yaml"), repeats=3, warmup=1)
    add_coco_arg(p)
    p.add_argument("--positions", default="0,10000,1000000", help="samples drawn before the resume (seek)")
    p.add_argument(
        "--replay-positions", default="10000", help="the same with a format-1 manifest ('' = none)"
    )
    p.add_argument("--workers", type=int, default=1, help="data.num_workers of the resumed loader")
    p.add_argument("--child", nargs=2, metavar=("SHARDS", "START_BATCH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> int:
    """In the spawned process: build the loader at START_BATCH, take one batch, print the times."""
    t0 = time.perf_counter()
    from common import bench_config

    from ticod.data.tokenizer import load_tokenizer
    from ticod.data.train_stream import build_train_loader

    shards, start_batch = Path(args.child[0]), int(args.child[1])
    cfg = bench_config(args, shards, f"data.num_workers={args.workers}")
    tokenizer = load_tokenizer(str(shards / "tokenizer"))
    t1 = time.perf_counter()
    batch = next(
        iter(
            build_train_loader(
                cfg.data, tokenizer, rank=0, world_size=1, seed=args.seed, start_batch=start_batch
            )
        )
    )
    t2 = time.perf_counter()
    print(json.dumps({"imports_s": t1 - t0, "loader_s": t2 - t1, "images": len(batch.image_sizes)}))
    return 0


def without_offsets(shards: Path, out: Path) -> Path:
    """A copy of ``shards`` whose manifest has no per-sample byte offsets (as format 1 wrote it)."""
    shutil.copytree(shards, out)
    for manifest in out.glob("*.json"):
        m = json.loads(manifest.read_text())
        if "shards" not in m:
            continue
        m["format"] = 1
        for s in m["shards"]:
            for key in ("offsets", "json", "sizes"):  # what format 2 added
                s.pop(key, None)
        manifest.write_text(json.dumps(m))
    return out


def first_batch_seconds(args: argparse.Namespace, shards: Path, start_batch: int, parts: list[dict]) -> float:
    """Spawn a child at ``start_batch``; wall seconds from the spawn to its first batch."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(shards),
        str(start_batch),
        "--config",
        args.config,
        "--workers",
        str(args.workers),
        "--seed",
        str(args.seed),
        "--set",
        *args.set,
    ]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    parts.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return wall


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    device = setup(args)
    report = Report("resume", device, vars(args))
    from common import bench_config
    from padding import shard_sample

    batch = bench_config(args, "unused").data.batch_size
    positions = [int(p) for p in args.positions.split(",")]
    replay = [int(p) for p in args.replay_positions.split(",") if p]
    with workdir() as tmp:
        seekable = shard_sample(Path(args.coco), tmp / "shards")
        old = without_offsets(seekable, tmp / "shards-format1")
        parts: dict[str, list[dict]] = {}
        sides = {}
        for name, shards, pos in [
            *(("seek", seekable, p) for p in positions),
            *(("replay", old, p) for p in replay),
        ]:
            key = f"{name} @ {pos:,}"
            parts[key] = []
            sides[key] = lambda s=shards, p=pos, k=key: first_batch_seconds(args, s, p // batch, parts[k])
        values = alternate(sides, repeats=args.repeats, warmup=args.warmup)
        base = f"seek @ {positions[0]:,}"
        rows = []
        for key, v in values.items():
            measured = parts[key][-len(v) :]
            loader = statistics.median(p["loader_s"] for p in measured)
            rows.append(
                Row(key, v, "s", "" if key == base else base, f"loader build + 1 batch {loader:.2f} s")
            )
        report.table(
            f"Process start -> first training batch after a resume (batch {batch}, {args.workers} worker(s), "
            f"80 COCO images in 4 shards, samples drawn before the resume)",
            rows,
        )
        top = f"seek @ {max(positions):,}"
        ratio = statistics.median(values[top]) / statistics.median(values[base])
        report.check(Target(f"first batch, {top} / {base}", ratio, TARGET, False, "medians"))
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
