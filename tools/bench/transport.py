"""Worker -> trainer transport: uint8 batches normalised on the device against float32 batches normalised
in the workers (what the loader sent before).

``python tools/bench/transport.py [--coco ../shared/coco_sample] [--workers 2] [--batches 12] [--repeats 3]``

Both sides run the training stream of :func:`ticod.data.train_stream.build_train_loader` over the
``--coco`` sample sharded into a temporary directory (real JPEGs, data settings of ``--config``, default
``configs/ticod_large.yaml``: short side 480-800, long side at most 1333), with ``--workers`` DataLoader
workers. ``float32`` swaps in a collate that normalises in the worker, as ``to_normalized_tensor`` did;
``uint8`` is the loader as it is, and its batches are normalised in this process by
:func:`ticod.models.ticod.normalize_pixels` (the model's own step) on ``--device``. Measured:

* bytes per image crossing from worker to trainer: every tensor of a batch (images, boxes, labels,
  caption ids and mask), per image; and the images alone;
* images/s of batches ``--warm-batches + 1 ..`` of a fresh loader (workers started anew each round),
  taken into this process and moved to ``--device``; alternating rounds. The ``+ normalise`` rows add
  the normalisation there (for float32: nothing to do). On a CPU ``--device`` that step competes with
  the workers for the same cores; on a GPU it is one small kernel.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
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
    sync,
    workdir,
)
from padding import shard_sample

from ticod.data.loader import data_loader
from ticod.data.samples import Batch, Batcher
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import build_train_loader
from ticod.models.ticod import normalize_pixels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/transport.json")
    p.set_defaults(config=str(ROOT / "configs" / "ticod_large.yaml"), repeats=3, warmup=1)
    add_coco_arg(p)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batches", type=int, default=12, help="measured batches per round")
    p.add_argument("--warm-batches", type=int, default=2, help="batches of each round not measured")
    return p.parse_args(argv)


class FloatBatcher(Batcher):
    """The loader's collate, then normalised in the worker: the float32 batches it sent before."""

    def __init__(self, tokenizer: Any, max_tokens: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__(tokenizer, max_tokens)
        self.mean, self.std = mean, std

    def __call__(self, samples: list[dict[str, Any]], stats: dict[str, Any]) -> Batch:
        batch = super().__call__(samples, stats)
        batch.images = normalize_pixels(batch.images, batch.image_sizes, self.mean, self.std)
        return batch


def float_loader(cfg: Any, tokenizer: Any, mean: torch.Tensor, std: torch.Tensor, seed: int) -> Any:
    """``build_train_loader`` with :class:`FloatBatcher` as its collate."""
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, seed=seed)
    stream = loader.dataset
    stream.batch = FloatBatcher(tokenizer, cfg.max_caption_tokens, mean, std)
    return data_loader(stream, cfg.num_workers)


def batch_bytes(batch: Batch) -> tuple[int, int]:
    """(bytes of every tensor of the batch, bytes of its images)."""
    tensors = [batch.images, *batch.captions.values()]
    tensors += [t for target in batch.targets for t in target.values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()), batch.images.untyped_storage().nbytes()


def loader_rate(
    make: Callable[[], Any], warm: int, n: int, device: torch.device, prepare: Callable[[dict], Any] | None
) -> Callable[[], float]:
    """images/s of batches ``warm + 1 .. warm + n`` of a fresh loader, into this process and onto ``device``."""

    def run() -> float:
        it = iter(make())
        for _ in range(warm):
            next(it)
        start, images = time.perf_counter(), 0
        for batch in itertools.islice(it, n):
            x = batch.images.to(device, non_blocking=True)
            if prepare is not None:
                prepare({**batch, "images": x})
            images += len(batch.image_sizes)
        sync(device)
        rate = images / (time.perf_counter() - start)
        del it  # shuts the workers down before the next side runs
        return rate

    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    report = Report("transport", device, vars(args))
    with workdir() as tmp:
        shards = shard_sample(Path(args.coco), tmp / "shards")
        cfg = bench_config(args, shards, f"data.num_workers={args.workers}").data
        cfg.tokenizer = str(shards / "tokenizer")
        tok = load_tokenizer(cfg.tokenizer)
        mean, std = (torch.tensor(list(v), dtype=torch.float32).view(1, 3, 1, 1) for v in (cfg.mean, cfg.std))
        dev_mean, dev_std = mean.to(device), std.to(device)

        def uint8() -> Any:
            return build_train_loader(cfg, tok, rank=0, world_size=1, seed=args.seed)

        def float32() -> Any:
            return float_loader(cfg, tok, mean, std, args.seed)

        def normalise(batch: Batch) -> torch.Tensor:
            return normalize_pixels(batch.images, batch.image_sizes, dev_mean, dev_std)

        sizes = {}
        for name, make in (("uint8", uint8), ("float32", float32)):
            got = list(itertools.islice(make(), args.batches))
            n = sum(len(b.image_sizes) for b in got)
            totals = [batch_bytes(b) for b in got]
            sizes[name] = (sum(t for t, _ in totals) / n, sum(i for _, i in totals) / n)
            print(
                f"{name}: {sizes[name][0] / 2**20:.2f} MiB per image ({sizes[name][1] / 2**20:.2f} of images)"
            )
        w, n, warm = args.workers, args.batches, args.warm_batches
        sides = {
            "float32": loader_rate(float32, warm, n, device, None),
            "uint8": loader_rate(uint8, warm, n, device, None),
            "uint8 + normalise": loader_rate(uint8, warm, n, device, normalise),
        }
        print("images/s:")
        v = alternate(sides, repeats=args.repeats, warmup=args.warmup)
    report.table(
        "Bytes per image, worker -> trainer",
        [
            Row("float32 batch (before)", [sizes["float32"][0]], "bytes/image"),
            Row("uint8 batch", [sizes["uint8"][0]], "bytes/image", "float32 batch (before)"),
            Row("float32 images", [sizes["float32"][1]], "bytes/image"),
            Row("uint8 images", [sizes["uint8"][1]], "bytes/image", "float32 images"),
        ],
    )
    report.table(
        f"Images/s into the training process ({w} workers, batch {cfg.batch_size}, {device})",
        [
            Row("float32 (normalised in the workers)", v["float32"], "images/s"),
            Row("uint8", v["uint8"], "images/s", "float32 (normalised in the workers)"),
            Row(
                "uint8 + normalise on the device",
                v["uint8 + normalise"],
                "images/s",
                "float32 (normalised in the workers)",
            ),
        ],
    )
    report.check(
        Target(
            "bytes per image, float32 / uint8",
            sizes["float32"][0] / sizes["uint8"][0],
            3.9,
            True,
            "whole batch",
        )
    )
    report.check(Target("image bytes, float32 / uint8", sizes["float32"][1] / sizes["uint8"][1], 4.0, True))
    by = {k: statistics.median(x) for k, x in v.items()}
    report.check(Target("images/s, uint8 / float32", by["uint8"] / by["float32"], 1.0, True, "medians"))
    report.check(
        Target(
            "images/s, uint8 + normalise / float32",
            by["uint8 + normalise"] / by["float32"],
            1.0,
            True,
            "medians",
        )
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
