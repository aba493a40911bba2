"""Checkpoints that do not stop training: the loop's blocking time per save, synchronous vs background write
(issue 27, point 1).

``python tools/bench/checkpoint.py [--config configs/ticod_small.yaml] [--image-size 320x224] [--saves 3]
[--every 1] [--ranks 2]``

Demo data (tools/make_demo_coco.py, 64 images) is sharded; ``ticod.train`` trains ``--config`` (default
TICOD-small, random init, the demo BPE tokenizer, fp32) under the ``deepspeed`` launcher with ``--ranks`` CPU
ranks and ZeRO-2, saving every ``--every`` steps, ``--saves`` times, once with ``checkpoint.async_save=false``
and once with ``true``. The trainer logs each save (``checkpoint/*`` rows of ``train_log.jsonl``, rank 0):
``blocking_s``, the time the loop waited, and ``total_s``, from the start of the save until it was
published (the rename after every rank's write). The final save of each run (it waits for its write before
the export) is left out. Target: async blocking ≤ 10% of the synchronous save's time (medians).
Timings of a shared CPU move with its load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import Report, Row, Target, make_demo_data, workdir
from requeue import add_small_run_args, launch, small_run_args

from ticod.checkpoint import list_checkpoints

TARGET = 0.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_small_run_args(p)
    p.add_argument("--saves", type=int, default=3, help="periodic saves measured per side")
    p.add_argument("--every", type=int, default=1, help="steps between saves")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--keep", default="", help="keep the data and run dirs here")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per training job")
    p.add_argument("--out", default="bench_results/checkpoint.json")
    return p.parse_args(argv)


def saves(run_dir: Path, last: int) -> list[dict[str, float]]:
    """The ``checkpoint/*`` rows of a run, but the final save's (step ``last``)."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "checkpoint/total_s" in r and r["step"] != last]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report("checkpoint", torch.device("cpu"), vars(args))
    with workdir(args.keep) as tmp:
        _, shards = make_demo_data(tmp / "data", 64, per_shard=16)
        steps = args.every * args.saves + 1  # the final save at a step of its own
        common = [
            *small_run_args(args.config, shards, args.image_size),
            "optim.warmup_steps=1",
            f"max_steps={steps}",
            f"checkpoint.save_every={args.every}",
            "checkpoint.keep_last=2",
            *args.set,
        ]
        results: dict[str, list[dict[str, float]]] = {}
        size = 0
        for side in ("sync", "async"):
            run = tmp / f"run-{side}"
            t = time.time()
            log = tmp / f"train-{side}.log"
            _, code = launch(
                args.ranks,
                [*common, f"run_dir={run}", f"checkpoint.async_save={side == 'async'}"],
                log,
                args.timeout,
            )
            if code != 0:
                raise SystemExit(f"{side}: training failed (exit {code}): see {log}")
            results[side] = saves(run, steps)
            ckpt = list_checkpoints(run)[-1]
            size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
            print(f"{side}: {time.time() - t:.0f} s, checkpoint {size / 2**20:.0f} MiB")
            for r in results[side]:
                print(
                    f"  step {r['step']}: blocking {r['checkpoint/blocking_s']:.2f} s, "
                    f"total {r['checkpoint/total_s']:.2f} s"
                )

        rows = [
            Row(f"{side} {kind}", [r[f"checkpoint/{kind}_s"] for r in results[side]], "s", "sync blocking")
            for side in ("sync", "async")
            for kind in ("blocking", "total")
        ]
        rows[0].ratio_to = ""
        rows[2].note = "the loop's wait per save"
        rows[3].note = "save -> published, the write in the background"
        report.table(
            f"one save of TICOD-small at {args.image_size}, {args.ranks} CPU ranks, ZeRO-2, "
            f"{size / 2**20:.0f} MiB per checkpoint",
            rows,
        )
        async_blocking = rows[2].median / rows[0].median
        report.check(
            Target("async blocking / sync save time", async_blocking, TARGET, higher_is_better=False)
        )
        report.extra.update(checkpoint_mib=size / 2**20, results=results)
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
