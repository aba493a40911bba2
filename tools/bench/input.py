"""Input pipeline: the WebDataset shard loader vs. a per-file COCO loader vs. the decode ceiling.

``python tools/bench/input.py [--workers 1 --batch-size 4 --images 400 --cold]``

Sides, alternating round by round, all on the same demo images (COCO-like sizes by default):

* ``shard loader``: :func:`ticod.data.train_stream.build_train_loader` (what training uses);
* ``per-file loader``: the usual torchvision/mmdet way: a map-style ``Dataset`` over a pycocotools ``COCO``
  index of the instances and captions JSON, opening one JPEG file per sample, in a ``DataLoader`` with
  the same batch size, worker count and prefetching, shuffled;
* ``decode ceiling``: the same JPEG bytes, already in memory, decoded and transformed in a tight loop in
  this one process (no reading, batching, tokenising or inter-process transfer).

Both loaders run the same per-sample code (``SampleProcessor``: EXIF-aware decode, box clean-up, random
resize, flip, normalise) and the same collate (padding, tokenising). With ``--no-decode`` rows the JPEG
stays bytes (no decode or image transform; annotations, captions and batching as before): that isolates
what the storage format costs. ``--cold`` drops this benchmark's files from the page cache before every
pass (``posix_fadvise(DONTNEED)``; nothing else on the machine is touched), as a first epoch over a
dataset larger than RAM sees them. Measured: images/s after ``--warm-batches`` batches of each pass.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from common import (
    Report,
    Row,
    Target,
    add_common_args,
    alternate,
    bench_config,
    make_demo_data,
    setup,
    workdir,
)
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from ticod.data.loader import data_loader
from ticod.data.samples import MISSING_JPEG, BadSample, Batch, SampleProcessor, StreamStats, collate
from ticod.data.shard_reader import split_shards
from ticod.data.shards import iter_shard, read_manifest
from ticod.data.tokenizer import encode_captions, load_tokenizer
from ticod.data.train_stream import _TrainStream, build_train_loader


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/input.json")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of both loaders")
    p.add_argument("--images", type=int, default=400, help="demo images to generate (without --data)")
    p.add_argument("--image-min", type=int, default=360, help="smallest demo image side (COCO: ~480)")
    p.add_argument("--image-max", type=int, default=640, help="largest demo image side (COCO: 640)")
    p.add_argument("--batches", type=int, default=40, help="measured batches per pass")
    p.add_argument("--warm-batches", type=int, default=4, help="batches of each pass not measured")
    p.add_argument("--cold", action="store_true", help="drop the files from the page cache before each pass")
    p.add_argument("--coco", default="", help="COCO dir (train/, annotations/) matching --data")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- per-sample processing
class RawProcessor(SampleProcessor):
    """Everything :class:`SampleProcessor` does except decoding and transforming the image."""

    def __call__(
        self,
        key: str,
        sample: dict[str, Any],
        rng: random.Random,
        stats: StreamStats,
        min_size: int | None = None,
    ) -> dict[str, Any]:
        meta = self._meta(sample)
        if "jpg" not in sample:
            raise BadSample(MISSING_JPEG)
        boxes, labels = self._targets(meta, int(meta["width"]), int(meta["height"]), stats)
        captions = list(meta["captions"])
        return {
            "jpg": torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8),
            "target": {"boxes": boxes, "labels": labels},
            "caption": rng.choice(captions) if captions else "",
            "meta": {"key": key, "image_id": int(meta["image_id"]), "captions": captions},
        }


class FromIndex:
    """Mixin: annotations come as a dict from the in-memory COCO index, not as ``.json`` bytes."""

    def _meta(self, sample: dict[str, Any]) -> dict[str, Any]:
        return sample["meta"]


class FileProcessor(FromIndex, SampleProcessor):
    pass


class FileRawProcessor(FromIndex, RawProcessor):
    pass


class Collate:
    """Batch of processed samples: the pipeline's collate, or a list of JPEG byte tensors when not decoded."""

    def __init__(self, tokenizer: Any, max_tokens: int, decode: bool) -> None:
        self.tokenizer, self.max_tokens, self.decode = tokenizer, max_tokens, decode

    def __call__(
        self, samples: list[dict[str, Any]], stats: dict[str, Any] | None = None
    ) -> Batch | dict[str, Any]:
        if self.decode:
            return collate(samples, self.tokenizer, self.max_tokens, stats or {})
        # Packed into one storage per kind, as the pipeline's collate does (cheap worker -> main transfer).
        counts = [len(s["target"]["boxes"]) for s in samples]
        boxes = torch.cat([s["target"]["boxes"] for s in samples]).split(counts)
        labels = torch.cat([s["target"]["labels"] for s in samples]).split(counts)
        jpgs = torch.cat([s["jpg"] for s in samples]).split([len(s["jpg"]) for s in samples])
        return {
            "jpgs": list(jpgs),
            "targets": [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)],
            "captions": encode_captions(self.tokenizer, [s["caption"] for s in samples], self.max_tokens),
            "meta": [s["meta"] for s in samples],
            "stats": stats or {},
        }


class CocoFiles(Dataset):
    """Map-style COCO dataset (torchvision ``CocoDetection`` style): pycocotools index + one file per image."""

    def __init__(self, images: Path, instances: Path, captions: Path, process: SampleProcessor) -> None:
        self.images, self.process = images, process
        self.coco, self.caps = COCO(str(instances)), COCO(str(captions))
        self.ids = sorted(self.coco.imgs)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[i]
        info = self.coco.imgs[image_id]
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        meta = {
            "image_id": image_id,
            "width": info["width"],
            "height": info["height"],
            "boxes": [a["bbox"] for a in anns],
            "category_ids": [a["category_id"] for a in anns],
            "iscrowd": [a["iscrowd"] for a in anns],
            "captions": [a["caption"] for a in self.caps.loadAnns(self.caps.getAnnIds(imgIds=image_id))],
        }
        with open(self.images / info["file_name"], "rb") as f:
            data = f.read()
        # Same per-sample RNG use as the shard stream: a seeded Random per draw.
        return self.process(f"{image_id:012d}", {"meta": meta, "jpg": data}, random.Random(i), StreamStats())


def per_file_loader(
    dataset: CocoFiles, batch: Collate, batch_size: int, workers: int, seed: int
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=batch,
        num_workers=workers,
        prefetch_factor=4 if workers else None,  # as the shard loader
        pin_memory=torch.cuda.is_available(),
    )


def raw_shard_loader(cfg: Any, tokenizer: Any, seed: int) -> DataLoader:
    """The training stream of build_train_loader with :class:`RawProcessor` in place of the decoding one."""
    shards, manifest = split_shards(cfg.shards_dir, cfg.train_split)
    stream = _TrainStream(
        shards,
        RawProcessor(cfg, manifest["categories"], train=True),
        Collate(tokenizer, cfg.max_caption_tokens, decode=False),
        batch_size=cfg.batch_size,
        shuffle_buffer=max(1, cfg.shuffle_buffer),
        seed=seed,
        rank=0,
        start_batch=0,
        origin=0,
        group_by_aspect=cfg.group_by_aspect,
    )
    return data_loader(stream, cfg.num_workers)


def endless(make: Callable[[], DataLoader]) -> Iterator[Batch | dict[str, Any]]:
    """Batches of a finite loader over and over (a new epoch when one ends)."""
    while True:
        yield from make()


# ----------------------------------------------------------------------------------- measurement
def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (written back first, so they can be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader_rate(
    make: Callable[[], Iterator[Batch | dict[str, Any]]], warm: int, n: int, files: list[Path] | None
) -> Callable[[], float]:
    """images/s of batches ``warm+1 .. warm+n`` of a fresh iterator (workers started anew each pass)."""

    def run() -> float:
        if files:
            evict(files)
        it = make()
        for _ in range(warm):
            next(it)
        start, images = time.perf_counter(), 0
        for batch in itertools.islice(it, n):
            # Decoded: a Batch (the shard loader, or collate over files); raw: Collate's dict of JPEG bytes.
            images += len(batch.targets if isinstance(batch, Batch) else batch["targets"])
        rate = images / (time.perf_counter() - start)
        del it  # shuts the workers down before the next side runs
        return rate

    return run


def ceiling_rate(samples: list[dict[str, Any]], process: SampleProcessor, n: int) -> Callable[[], float]:
    """images/s of decode + transforms alone, in this process, on JPEG bytes already in memory."""

    def run() -> float:
        stats, rng = StreamStats(), random.Random(0)
        start = time.perf_counter()
        for sample in itertools.islice(itertools.cycle(samples), n):
            process(sample["__key__"], sample, rng, stats)
        return n / (time.perf_counter() - start)

    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    report = Report("input", device, vars(args))
    with workdir() as tmp:
        if args.data:
            shards_dir, coco = Path(args.data), Path(args.coco)
        else:
            coco, shards_dir = make_demo_data(
                tmp, args.images, min_size=args.image_min, max_size=args.image_max
            )
        cfg = bench_config(args, shards_dir, f"data.num_workers={args.workers}").data
        tok = load_tokenizer(shards_dir / "tokenizer")
        manifest = read_manifest(shards_dir, cfg.train_split)
        shard_files = [shards_dir / s["name"] for s in manifest["shards"]]
        ann = coco / "annotations"
        instances, captions = (
            ann / f"instances_{cfg.train_split}.json",
            ann / f"captions_{cfg.train_split}.json",
        )
        image_files = sorted((coco / cfg.train_split).glob("*.jpg"))
        samples = [s for f in shard_files for s in iter_shard(str(f), lambda e: False)]
        files = {
            "shards": shard_files if args.cold else None,
            "per_file": [*image_files, instances, captions] if args.cold else None,
        }
        cats = manifest["categories"]
        datasets = {
            decode: CocoFiles(
                coco / cfg.train_split,
                instances,
                captions,
                (FileProcessor if decode else FileRawProcessor)(cfg, cats, train=True),
            )
            for decode in (True, False)
        }
        batch = {d: Collate(tok, cfg.max_caption_tokens, decode=d) for d in (True, False)}
        b, w, n, warm = cfg.batch_size, cfg.num_workers, args.batches, args.warm_batches
        print(f"{len(samples)} images, batch {b}, {w} workers, {n} batches per pass after {warm}")
        sides = {
            "ceiling": ceiling_rate(samples, SampleProcessor(cfg, cats, train=True), n * b),
            "shards": loader_rate(
                lambda: iter(build_train_loader(cfg, tok, rank=0, world_size=1, seed=args.seed)),
                warm,
                n,
                files["shards"],
            ),
            "per_file": loader_rate(
                lambda: endless(lambda: per_file_loader(datasets[True], batch[True], b, w, args.seed)),
                warm,
                n,
                files["per_file"],
            ),
            "shards_raw": loader_rate(
                lambda: iter(raw_shard_loader(cfg, tok, args.seed)), warm, n, files["shards"]
            ),
            "per_file_raw": loader_rate(
                lambda: endless(lambda: per_file_loader(datasets[False], batch[False], b, w, args.seed)),
                warm,
                n,
                files["per_file"],
            ),
        }
        print("images/s:")
        v = alternate(sides, repeats=args.repeats, warmup=args.warmup)
    cache = "cold page cache" if args.cold else "files in page cache"
    rows = [
        Row("decode ceiling (1 process, bytes in memory)", v["ceiling"], "images/s"),
        Row("shard loader", v["shards"], "images/s", "decode ceiling (1 process, bytes in memory)"),
        Row("per-file COCO loader", v["per_file"], "images/s", "shard loader"),
        Row(
            "shard loader, no decode",
            v["shards_raw"],
            "images/s",
            "decode ceiling (1 process, bytes in memory)",
        ),
        Row("per-file COCO loader, no decode", v["per_file_raw"], "images/s", "shard loader, no decode"),
    ]
    report.table(f"Input pipeline ({w} workers, batch {b}, {cache})", rows)
    by = {r.name: r.median for r in rows}
    shard, per_file = by["shard loader"], by["per-file COCO loader"]
    report.check(Target("shard loader / decode ceiling", shard / by[rows[0].name], 0.85, True))
    report.check(Target("shard loader / per-file loader (decode)", shard / per_file, 1.2, True))
    raw = by["shard loader, no decode"] / by["per-file COCO loader, no decode"]
    report.check(Target("shard loader / per-file loader (no decode)", raw, 3.0, True))
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
