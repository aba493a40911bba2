"""Padding of training batches: aspect-ratio grouping (``data.group_by_aspect``) against the plain stream.

``python tools/bench/padding.py [--coco ../shared/coco_sample] [--batches 25] [--repeats 3]``

Real COCO sizes: the train2017 images of ``--coco`` (``images/`` + ``instances_train2017.json`` +
``captions_train2017.json``; ``../shared/coco_sample`` has 80) are sharded into a temporary directory and
read by :func:`ticod.data.train_stream.build_train_loader` itself, with the data settings of ``--config``
(default ``configs/ticod_large.yaml``: short side drawn from 480-800, long side at most 1333), at batch
2, 4 and 8, grouped and not. Measured per setting and seed (one round per ``--repeats``):

* ``padded / real pixels``: Σ over batches of B × H × W of the collated batch ÷ Σ of the images' own
  h × w (1.0: no padding); ``backbone canvas`` rounds H and W up to the backbone's 32 as the model does.

Then the cost: forward + backward of a small Swin backbone (``--backbone``, default the demo's Swin-T
shape with embed_dim 32 and depths 1-1-2-1, random init, CPU float32) over the first ``--step-batches``
batches of 2 of each stream at 1333×800 (short side 800), alternating grouped and plain rounds: seconds
per image.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

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
    workdir,
)

from ticod.config import BackboneConfig
from ticod.data.coco import load_records
from ticod.data.samples import Batch
from ticod.data.shards import write_shards
from ticod.data.tokenizer import load_tokenizer, train_caption_tokenizer
from ticod.data.train_stream import build_train_loader
from ticod.models.backbone import SwinBackbone, pad_to_multiple

TARGET = 1.10  # grouped padded / real pixels (issue 14)
DEMO_SWIN = {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "window_size": 7}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/padding.json")
    p.set_defaults(config=str(ROOT / "configs" / "ticod_large.yaml"), repeats=3, warmup=0)
    add_coco_arg(p)
    p.add_argument("--batch-sizes", default="2,4,8", help="images per batch to compare")
    p.add_argument("--batches", type=int, default=25, help="batches per setting and round")
    p.add_argument("--step-batches", type=int, default=4, help="batches of 2 per step-time round (0: skip)")
    p.add_argument("--backbone", default="swin_tiny_patch4_window7_224", help="timm Swin of the step time")
    return p.parse_args(argv)


def shard_sample(coco: Path, out: Path, split: str = "train", per_shard: int = 20) -> Path:
    """``coco``'s images as ``split`` shards with a byte-level BPE (what tools/shard_coco.py would write)."""
    records, categories = load_records(coco / "instances_train2017.json", coco / "captions_train2017.json")
    write_shards(
        records, categories, coco / "images", out, split, samples_per_shard=per_shard, progress=False
    )
    train_caption_tokenizer([c for r in records for c in r["captions"]], out / "tokenizer", 400)
    return out


def batches(
    args: argparse.Namespace, shards: Path, batch: int, grouped: bool, seed: int, n: int, *extra: str
) -> list[Batch]:
    """The first ``n`` batches (images and sizes) of the training stream of the sharded sample."""
    group = f"data.group_by_aspect={str(grouped).lower()}"
    cfg = bench_config(args, shards, f"data.batch_size={batch}", group, *extra)
    cfg.data.tokenizer = str(shards / "tokenizer")
    loader = build_train_loader(cfg.data, load_tokenizer(cfg.data.tokenizer), rank=0, world_size=1, seed=seed)
    return [Batch(b.images, b.image_sizes) for b in itertools.islice(loader, n)]


def padding_ratio(batches: list[Batch], divisor: int = 1) -> float:
    canvas = real = 0
    for b in batches:
        n, _, h, w = b.images.shape
        canvas += n * (-(-h // divisor) * divisor) * (-(-w // divisor) * divisor)
        real += sum(h * w for h, w in b.image_sizes)
    return canvas / real


def step_seconds_per_image(backbone: SwinBackbone, batches: list[Batch]) -> float:
    """Forward + backward of the backbone over ``batches`` (normalised as the model does), s per image."""
    start = time.perf_counter()
    for b in batches:
        x = pad_to_multiple(b.images.float().div(255).sub(0.45).div(0.225), backbone.size_divisor)
        feats = backbone(x)
        sum(f.float().mean() for f in feats.values()).backward()
    return (time.perf_counter() - start) / sum(len(b.image_sizes) for b in batches)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    report = Report("padding", device, vars(args))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with workdir() as tmp:
        shards = shard_sample(Path(args.coco), tmp / "shards")
        canvas: dict[str, list[float]] = {}
        backbone_canvas: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for b, grouped in itertools.product(sizes, (False, True)):
                got = batches(args, shards, b, grouped, args.seed + r, args.batches)
                name = f"batch {b}, {'grouped' if grouped else 'plain'}"
                canvas.setdefault(name, []).append(padding_ratio(got))
                backbone_canvas.setdefault(name, []).append(padding_ratio(got, 32))
            print(
                f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in canvas.items())
            )
        rows = [
            Row(k, v, "padded/real", "" if "plain" in k else k.replace("grouped", "plain"))
            for k, v in canvas.items()
        ]
        report.table(
            f"Padded ÷ real pixels per batch ({args.batches} batches per round, collated batch)", rows
        )
        report.table(
            "Padded ÷ real pixels, backbone canvas (H, W rounded up to 32)",
            [
                Row(k, v, "padded/real", "" if "plain" in k else k.replace("grouped", "plain"))
                for k, v in backbone_canvas.items()
            ],
        )
        for k, v in canvas.items():
            if "grouped" in k:
                report.check(Target(f"padded/real pixels, {k}", max(v), TARGET, False, "worst round"))
        if args.step_batches:
            torch.manual_seed(args.seed)
            backbone = SwinBackbone(BackboneConfig(name=args.backbone, drop_path_rate=0.0, kwargs=DEMO_SWIN))
            # At 1333×800 (short side 800): the first batches of 2 of each stream.
            first = {
                g: batches(args, shards, 2, g, args.seed, args.step_batches, "data.train_min_sizes=[800]")
                for g in (False, True)
            }
            shapes = {g: [tuple(b.images.shape[-2:]) for b in first[g]] for g in (False, True)}
            print(f"step-time batches (H, W): plain {shapes[False]}, grouped {shapes[True]}")
            sides = {
                "plain": lambda: step_seconds_per_image(backbone, first[False]),
                "grouped": lambda: step_seconds_per_image(backbone, first[True]),
            }
            v = alternate(sides, repeats=args.repeats, warmup=1)
            report.table(
                f"Backbone forward+backward at ≤1333×800 ({args.backbone} {DEMO_SWIN}, batch 2, CPU fp32)",
                [
                    Row("plain", v["plain"], "s/image"),
                    Row("grouped", v["grouped"], "s/image", "plain"),
                ],
            )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
