"""Bytes one evaluation reads from the val shards, over all ranks and workers (issue 14, point 4).

``python tools/bench/eval_read.py [--ranks 8] [--workers 2] [--repeats 3]``

The 80 real COCO images of ``--coco`` are written as a val split of 4 shards of 20 (fewer shards than
ranks × workers, the case where every stream used to read every shard). For each rank in turn (ranks
simulated one after the other in this process) the evaluation's reads are made as ``ticod.evaluate``
makes them: on rank 0 the ground truth rebuilt from the shards (``load_ground_truth`` without COCO JSON
files, the costlier of its two sources), on every rank every batch of :func:`ticod.data.eval_stream.build_eval_loader` with
``--workers`` real DataLoader worker processes. Every byte read through the shard reader's ``open`` is
counted, in the workers too (a counter in shared memory), and divided by the split's size on disk.

Sides: ``format 2`` (byte offsets: each stream reads its contiguous share from its first sample's
offset; the ground truth reads only the ``.json`` members) and ``format 1`` (the same shards with the
offsets taken out of the manifest: each stream reads its shards from their start, the ground truth reads
every shard through). Target: format 2 ≤ 1.1 × the split's size.
"""

from __future__ import annotations

import argparse
import builtins
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    Report,
    Row,
    Target,
    add_coco_arg,
    add_common_args,
    alternate,
    bench_config,
    setup,
    workdir,
)
from padding import shard_sample
from resume import without_offsets

import ticod.data.shards as shards_module
from ticod.data.eval_stream import build_eval_loader
from ticod.data.tokenizer import load_tokenizer
from ticod.ground_truth import load_ground_truth

TARGET = 1.10  # bytes read per evaluation / val split on disk


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/eval_read.json")
    p.set_defaults(config=str(ROOT / "configs" / "ticod_large.yaml"), repeats=3, warmup=0)
    add_coco_arg(p)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="data.num_workers per rank")
    p.add_argument("--per-shard", type=int, default=20, help="samples per val shard")
    return p.parse_args(argv)


class CountingOpen:
    """``open`` for ticod.data.shards that adds the bytes read through it to a shared counter.

    The counter lives in shared memory and the loader's workers are forked with the patched module, so
    their reads count too.
    """

    def __init__(self) -> None:
        self.total = multiprocessing.Value("q", 0)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(*args, **kwargs)  # noqa: SIM115 (handed to the caller, who closes it)
        read, total = f.read, self.total

        def counted(n: int = -1) -> bytes:
            data = read(n)
            with total.get_lock():
                total.value += len(data)
            return data

        f.read = counted
        return f


def one_evaluation(
    args: argparse.Namespace, shards: Path, counter: CountingOpen, seen: list[int], parts: dict[str, int]
) -> float:
    """Every rank's reads of one evaluation; the bytes read. ``seen`` gets the image ids scored, ``parts``
    the bytes of the ground truth and of the loaders."""
    cfg = bench_config(
        args, shards, f"data.num_workers={args.workers}", f"data.tokenizer={shards / 'tokenizer'}"
    )
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    counter.total.value = 0
    for rank in range(args.ranks):
        if rank == 0:  # only rank 0 scores, and reads the ground truth (ticod.evaluate.run_evaluation)
            load_ground_truth.cache_clear()
            before = counter.total.value
            load_ground_truth("", "", str(shards), cfg.data.val_split)
            parts["ground truth"] = counter.total.value - before
        for batch in build_eval_loader(cfg.data, tokenizer, rank=rank, world_size=args.ranks):
            seen += [int(m["image_id"]) for m in batch.meta]
    parts["loaders"] = counter.total.value - parts["ground truth"]
    return float(counter.total.value)


def split_note(parts: dict[str, int]) -> str:
    total = sum(parts.values())
    return f"ground truth {parts['ground truth'] / total:.1%}, loaders {parts['loaders'] / total:.1%}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    report = Report("eval_read", device, vars(args))
    counter = CountingOpen()
    shards_module.open = counter  # module global: shadows the builtin for iter_shard and the JSON reader
    with workdir() as tmp:
        new = shard_sample(Path(args.coco), tmp / "shards", "val", args.per_shard)
        old = without_offsets(new, tmp / "shards-format1")
        manifest = shards_module.read_manifest(new, "val")
        on_disk = sum((new / s["name"]).stat().st_size for s in manifest["shards"])
        expected = sorted(int(k) for s in manifest["shards"] for k in s["keys"])
        seconds: dict[str, list[float]] = {"format 2": [], "format 1": []}
        parts: dict[str, dict[str, int]] = {}

        def side(name: str, shards: Path) -> float:
            seen: list[int] = []
            t = time.perf_counter()
            parts[name] = {}
            n = one_evaluation(args, shards, counter, seen, parts[name])
            seconds[name].append(time.perf_counter() - t)
            if sorted(seen) != expected:  # the benchmark is void if an image was missed or repeated
                raise SystemExit(
                    f"{name}: {len(seen)} images scored, {len(set(seen))} distinct, {len(expected)} expected"
                )
            return n / on_disk

        values = alternate(
            {"format 2": lambda: side("format 2", new), "format 1": lambda: side("format 1", old)},
            repeats=args.repeats,
            warmup=args.warmup,
        )
        title = (
            f"Bytes read per evaluation ÷ val split on disk ({on_disk / 2**20:.1f} MiB, "
            f"{len(manifest['shards'])} shards, {len(expected)} images; {args.ranks} ranks × {args.workers} workers; "
            "ground truth rebuilt from the shards on rank 0)"
        )
        report.table(
            title,
            [
                Row(
                    "format 2 (byte offsets)",
                    values["format 2"],
                    "× split",
                    "",
                    split_note(parts["format 2"]),
                ),
                Row(
                    "format 1 (no offsets)",
                    values["format 1"],
                    "× split",
                    "format 2 (byte offsets)",
                    split_note(parts["format 1"]),
                ),
            ],
        )
        report.table(
            "Wall time of the simulated evaluation (all ranks one after the other, CPU)",
            [Row(k, v, "s", "" if k == "format 2" else "format 2") for k, v in seconds.items()],
        )
        report.extra["bytes"] = {"on_disk": on_disk, **parts}
        report.check(
            Target("bytes read / split size, format 2", max(values["format 2"]), TARGET, False, "worst round")
        )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
