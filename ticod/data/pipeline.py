"""Training and evaluation input streams: shards -> samples -> transformed, tokenised, collated batches.

Each stream is a flat list of stages run inside one dataloader worker (see ``_TrainStream.__iter__`` and
``_EvalStream.__iter__``); batches are collated in the worker and the ``DataLoader`` runs with
``batch_size=None``. Collating in the worker is what lets every batch carry ``stats`` (samples read and
skipped by reason in that worker since its previous batch), so the main process can count bad samples
across worker processes; it also moves padding off the training process.

Bad data never stops a job: unreadable or truncated shards, malformed members, undecodable JPEGs and
unusable annotations skip the sample and count it by reason in ``stats["bad"]``. Boxes that are dropped
while the sample is kept (zero-size, or outside the image) are counted in ``stats["fixed"]``. Only the
``.jpg`` and ``.json`` members are ever read (no automatic decoding of other extensions, no pickle),
and nothing is extracted to disk.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import math
import multiprocessing
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ticod.config import DataConfig
from ticod.data.coco import CategoryMap
from ticod.data.shards import iter_shard, read_manifest
from ticod.data.tokenizer import encode_captions
from ticod.data.transforms import (
    SizeMismatchError,
    clip_boxes,
    decode_rgb,
    hflip,
    keep_nondegenerate,
    resize,
    swap_left_right,
    to_normalized_tensor,
    xywh_to_xyxy,
)

__all__ = ["EvalLoader", "build_eval_loader", "build_train_loader", "read_manifest"]

log = logging.getLogger(__name__)

# Reasons a sample is skipped (stats["bad"]) ...
UNREADABLE_SHARD = "unreadable_shard"  # the whole shard: each of its manifest samples counts once
TRUNCATED_SHARD = "truncated_shard"  # samples the manifest promises that a damaged shard did not give
MISSING_JSON = "missing_json"
BAD_JSON = "bad_json"
MISSING_JPEG = "missing_jpeg"
BAD_JPEG = "bad_jpeg"
SIZE_MISMATCH = "size_mismatch"
BAD_ANNOTATION = "bad_annotation"
# ... and boxes dropped from samples that are kept (stats["fixed"]).
DEGENERATE_BOX = "degenerate_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"


class BadSample(Exception):
    """A sample that cannot be used; ``args[0]`` is the reason it is counted under."""


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int  # per the manifest
    offset: int  # global index of its first sample in the split


class StreamStats:
    """Counters of one worker's stream, handed out with each batch and reset."""

    def __init__(self) -> None:
        self.read = 0
        self.bad: Counter[str] = Counter()
        self.fixed: Counter[str] = Counter()

    def pop(self) -> dict[str, Any]:
        out = {"read": self.read, "bad": dict(self.bad), "fixed": dict(self.fixed)}
        self.__init__()
        return out

    def pending(self) -> bool:
        return bool(self.read or self.bad or self.fixed)


def _shards(shards_dir: str, split: str) -> tuple[list[Shard], dict[str, Any]]:
    manifest = read_manifest(shards_dir, split)
    shards, offset = [], 0
    for s in manifest["shards"]:
        shards.append(Shard(str(Path(shards_dir) / s["name"]), int(s["samples"]), offset))
        offset += int(s["samples"])
    return shards, manifest


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------------------- stages
def read_samples(
    shards: Iterable[Shard],
    stats: StreamStats,
    max_empty_in_a_row: int = 0,
    keep: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global index, raw sample) for every sample of ``shards``; damaged shards are counted, not raised.

    webdataset's handlers either re-raise or sleep per error, and a truncated tar silently drops the rest
    of its shard; comparing with the manifest count makes that loss visible. ``max_empty_in_a_row`` > 0
    raises RuntimeError after that many consecutive shards gave no sample (an endless stream over
    unreadable data would otherwise hang the job instead of failing it). With ``keep``, only the indices
    it accepts are yielded and counted as bad when lost (eval streams that share shards each own some
    indices: a lost sample is counted by its owner only); ``stats.read`` still counts every sample.
    """
    empty_in_a_row = 0

    def log_member_error(exn: Exception) -> bool:
        log.warning("skipping unreadable shard member: %s", exn)
        return True

    for shard in shards:
        n, failed = 0, False
        try:
            for sample in iter_shard(shard.path, log_member_error):
                stats.read += 1
                n += 1
                if keep is None or keep(shard.offset + n - 1):
                    yield shard.offset + n - 1, sample
        except Exception as e:
            failed = True
            log.warning("%s: unreadable or truncated shard after %d samples (%s)", shard.path, n, e)
        if n < shard.samples:
            lost = range(shard.offset + n, shard.offset + shard.samples)
            stats.read += len(lost)
            owned = len(lost) if keep is None else sum(map(keep, lost))
            if owned:
                stats.bad[UNREADABLE_SHARD if failed and n == 0 else TRUNCATED_SHARD] += owned
        empty_in_a_row = 0 if n else empty_in_a_row + 1
        if max_empty_in_a_row and empty_in_a_row >= max_empty_in_a_row:
            raise RuntimeError(
                f"{empty_in_a_row} shards in a row had no readable sample (last: {shard.path})"
            )


class SampleProcessor:
    """Raw shard sample -> transformed image, targets, caption text and meta (raises :class:`BadSample`)."""

    def __init__(self, cfg: DataConfig, categories: Sequence[dict[str, Any]], *, train: bool) -> None:
        self.cmap = CategoryMap(categories)
        self.train = train
        self.min_sizes = [int(s) for s in cfg.train_min_sizes] if train else [int(cfg.test_min_size)]
        self.max_size = int(cfg.max_size)
        self.hflip_prob = float(cfg.hflip_prob) if train else 0.0  # eval never flips
        self.mean, self.std = list(cfg.mean), list(cfg.std)

    def _meta(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "json" not in sample:
            raise BadSample(MISSING_JSON)
        try:
            meta = json.loads(sample["json"])
            n = len(meta["boxes"])
            if not all(len(meta[k]) == n for k in ("category_ids", "iscrowd")):
                raise ValueError("annotation lists differ in length")
            for k in ("image_id", "width", "height"):
                int(meta[k])
            if not all(isinstance(c, str) for c in meta["captions"]):
                raise ValueError("captions must be strings")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise BadSample(BAD_JSON) from e
        return meta

    def _targets(
        self, meta: dict[str, Any], width: int, height: int, stats: StreamStats
    ) -> tuple[torch.Tensor, ...]:
        try:
            boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor([self.cmap.to_label(c) for c in meta["category_ids"]], dtype=torch.int64)
            crowd = torch.tensor([bool(c) for c in meta["iscrowd"]], dtype=torch.bool)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # unknown category, ragged boxes
            raise BadSample(BAD_ANNOTATION) from e
        if not torch.isfinite(boxes).all():
            raise BadSample(BAD_ANNOTATION)
        boxes, labels = xywh_to_xyxy(boxes[~crowd]), labels[~crowd]  # crowd regions are not targets
        # COCO boxes often poke a fraction of a pixel past the border: clip quietly, count real losses.
        clipped = clip_boxes(boxes, width, height)
        ok_raw, ok = keep_nondegenerate(boxes), keep_nondegenerate(clipped)
        for reason, n in (
            (DEGENERATE_BOX, int((~ok_raw).sum())),
            (BOX_OUTSIDE_IMAGE, int((ok_raw & ~ok).sum())),
        ):
            if n:
                stats.fixed[reason] += n
        return clipped[ok], labels[ok]

    def __call__(
        self, key: str, sample: dict[str, Any], rng: random.Random, stats: StreamStats
    ) -> dict[str, Any]:
        meta = self._meta(sample)
        if "jpg" not in sample:
            raise BadSample(MISSING_JPEG)
        try:
            image = decode_rgb(sample["jpg"], (int(meta["width"]), int(meta["height"])))
        except SizeMismatchError as e:
            raise BadSample(SIZE_MISMATCH) from e
        except Exception as e:  # PIL raises many types for corrupt data
            raise BadSample(BAD_JPEG) from e
        w, h = image.size
        boxes, labels = self._targets(meta, w, h, stats)
        min_size = rng.choice(self.min_sizes)
        image, boxes = resize(image, boxes, min_size, self.max_size)
        flipped = self.hflip_prob > 0 and rng.random() < self.hflip_prob
        if flipped:
            image, boxes = hflip(image, boxes)
        keep = keep_nondegenerate(boxes)  # tiny boxes can shrink below a pixel when downscaled
        captions = list(meta["captions"])
        caption = (rng.choice(captions) if self.train else captions[0]) if captions else ""
        if flipped:
            caption = swap_left_right(caption)
        return {
            "image": to_normalized_tensor(image, self.mean, self.std),
            "target": {"boxes": boxes[keep], "labels": labels[keep]},
            "caption": caption,
            "meta": {
                "key": key,
                "image_id": int(meta["image_id"]),
                "orig_size": (h, w),
                "scale": min(min_size / min(h, w), self.max_size / max(h, w)),
                "flipped": flipped,
                "captions": captions,
            },
        }


def collate(
    samples: Sequence[dict[str, Any]], tokenizer: Any, max_tokens: int, stats: dict[str, Any]
) -> dict[str, Any]:
    """Processed samples -> the batch dict every consumer relies on (images padded bottom/right).

    The per-image boxes and labels are views into one tensor each, and ``input_ids``/``attention_mask`` views
    into one: a worker hands every tensor storage to the main process separately (a shared-memory file
    and a descriptor passed over a socket each), so 4 storages per batch instead of 2·B + 3 is what makes
    the transfer cheap (tools/bench/input.py measures it).
    """
    h = max((s["image"].shape[1] for s in samples), default=0)
    w = max((s["image"].shape[2] for s in samples), default=0)
    images = torch.zeros(len(samples), 3, h, w)
    for i, s in enumerate(samples):
        images[i, :, : s["image"].shape[1], : s["image"].shape[2]] = s["image"]
    if samples:
        captions = encode_captions(tokenizer, [s["caption"] for s in samples], max_tokens)
        ids_and_mask = torch.stack([captions["input_ids"], captions["attention_mask"]])
        captions = {"input_ids": ids_and_mask[0], "attention_mask": ids_and_mask[1]}
    else:
        captions = {k: torch.zeros(0, 0, dtype=torch.int64) for k in ("input_ids", "attention_mask")}
    counts = [len(s["target"]["boxes"]) for s in samples]
    boxes = torch.cat([s["target"]["boxes"].reshape(-1, 4) for s in samples] or [torch.zeros(0, 4)])
    labels = torch.cat([s["target"]["labels"] for s in samples] or [torch.zeros(0, dtype=torch.int64)])
    targets = [
        {"boxes": b, "labels": lab} for b, lab in zip(boxes.split(counts), labels.split(counts), strict=True)
    ]
    return {
        "images": images,
        "image_sizes": [tuple(s["image"].shape[1:]) for s in samples],
        "targets": targets,
        "captions": captions,
        "meta": [s["meta"] for s in samples],
        "stats": stats,
    }


def process_all(
    indexed: Iterable[tuple[int, dict[str, Any]]],
    process: SampleProcessor,
    rng: random.Random,
    stats: StreamStats,
) -> list[dict[str, Any]]:
    """Process a group of raw samples, dropping (and counting) the bad ones."""
    out = []
    for _, sample in indexed:
        key = str(sample.get("__key__", "?"))
        try:
            out.append(process(key, sample, rng, stats))
        except BadSample as e:
            stats.bad[e.args[0]] += 1
            log.warning("skipping sample %s from %s: %s", key, sample.get("__url__"), e.args[0])
    return out


# ------------------------------------------------------------------------------------------ train
class _TrainStream(IterableDataset):
    """Infinite, shuffled, resampled batches for one rank; reproducible from (seed, rank, worker, start)."""

    def __init__(
        self,
        shards: list[Shard],
        process: SampleProcessor,
        batch: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]],
        *,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        start_batch: int,
        origin: int,
    ) -> None:
        self.shards, self.process, self.batch = shards, process, batch
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.start_batch = start_batch
        # Stream seeds: (seed, rank) for a run's first layout, as always; a run that resumed onto another
        # layout (world size, workers, batch size) at optimizer step `origin` draws fresh streams.
        self.key = f"{seed}:{rank}" if origin == 0 else f"{seed}@{origin}:{rank}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, workers = _worker()
        # The DataLoader takes batches from its workers round-robin starting at worker 0, so the rank's
        # batch b comes from worker b % workers. A resumed loader starts at batch start_batch: its
        # worker 0 plays the part of worker start_batch % workers of the uninterrupted run, and so on.
        worker = (physical + self.start_batch) % workers
        # String seeds hash with SHA-512: stable across processes and PYTHONHASHSEED.
        rng = random.Random(f"ticod-train:{self.key}:{worker}")
        stats = StreamStats()
        weights = [s.samples for s in self.shards]
        shard_stream = (rng.choices(self.shards, weights)[0] for _ in itertools.repeat(None))  # endless
        samples = read_samples(shard_stream, stats, max_empty_in_a_row=10 + 2 * len(self.shards))
        samples = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        groups = wds.filters.batched(self.batch_size, collation_fn=None)(samples)
        # Of the rank's first start_batch batches this worker made every workers-th one. Skipping raw
        # groups (no decode) replays the stream to the same point; their stats were counted already.
        skip = len(range(worker, self.start_batch, workers))
        for _ in range(skip):
            next(groups)
        stats.pop()
        for index, group in enumerate(groups, start=skip):
            # Transforms draw from a per-group RNG: the skipped groups above never drew from it.
            group_rng = random.Random(f"ticod-augment:{self.key}:{worker}:{index}")
            good = process_all(group, self.process, group_rng, stats)
            if good:  # an all-bad group (practically never) makes no batch; its stats go with the next
                yield self.batch(good, stats.pop())


def build_train_loader(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
    origin: int = 0,
    split: str | None = None,
) -> DataLoader:
    """Endless training batches of ``cfg.batch_size`` for ``rank`` (see the module doc for the batch format).

    Every (rank, worker) resamples shards (weighted by sample count) and shuffles with its own RNG seeded
    from ``(seed, rank, worker)``, so ranks see different data and a run is reproducible. Resuming:
    ``start_batch`` = batches this rank already consumed; the loader then yields exactly what an
    uninterrupted run would have yielded from that point (the stream is replayed without decoding
    images; exact unless a whole group of ``batch_size`` samples was unusable). Needs the same seed,
    world size, batch size and ``num_workers`` as the interrupted run.

    Args:
        cfg: Data config (shards_dir, batch_size, num_workers, sizes, flip, shuffle buffer, ...).
        tokenizer: From :func:`ticod.data.tokenizer.load_tokenizer`.
        rank: This process's rank.
        world_size: Number of ranks (the streams of different ranks differ through ``rank`` in the seed).
        seed: Run seed.
        start_batch: Batches to skip (resume), counted from ``origin``.
        origin: The optimizer step at which this data layout began: 0 for a run's first layout; the step
            of the checkpoint when a run resumed with another world size, worker count or batch size
            (the old streams cannot be continued then; fresh ones are drawn, keyed by this step).
        split: Shard split; ``cfg.train_split`` when None.
    """
    del world_size  # resampling needs no partition: each rank draws its own shard sequence
    shards, manifest = _shards(cfg.shards_dir, split or cfg.train_split)
    process = SampleProcessor(cfg, manifest["categories"], train=True)
    stream = _TrainStream(
        shards,
        process,
        _Batcher(tokenizer, cfg.max_caption_tokens),
        batch_size=cfg.batch_size,
        shuffle_buffer=max(1, cfg.shuffle_buffer),
        seed=seed,
        rank=rank,
        start_batch=start_batch,
        origin=origin,
    )
    return _data_loader(stream, cfg.num_workers)


class _Batcher:
    """Collate with the tokenizer bound (a picklable callable for spawned workers)."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, samples: list[dict[str, Any]], stats: dict[str, Any]) -> dict[str, Any]:
        return collate(samples, self.tokenizer, self.max_tokens, stats)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers outlive SIGTERM/SIGUSR1 so that the training process can act on them.

    Slurm signals every process of a job step and the deepspeed launcher the whole process tree; a worker
    killed by the signal (torch's worker handler re-raises SIGTERM) makes the main process raise "DataLoader
    worker is killed" mid-step, before the preemption checkpoint. Workers still end with the main process.
    """
    del worker_id
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL the loader workers still alive (after an error, say).

    multiprocessing's own exit hook would SIGTERM them, which they ignore, then wait for them forever: a
    rank that failed (e.g. on a distributed timeout) would hang instead of exiting. Registered after
    multiprocessing's hook, so it runs first.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def _data_loader(stream: IterableDataset, num_workers: int) -> DataLoader:
    if num_workers:
        atexit.unregister(_kill_leftover_workers)  # once, however many loaders are built
        atexit.register(_kill_leftover_workers)
    return DataLoader(
        stream,
        batch_size=None,  # batches are made (and their stats attached) inside the workers
        collate_fn=_as_is,  # the default would turn the (h, w) tuples into lists
        num_workers=num_workers,
        worker_init_fn=_ignore_stop_signals,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


# ------------------------------------------------------------------------------------------- eval
class _EvalStream(IterableDataset):
    """Each sample of the split exactly once across all ranks and workers."""

    def __init__(
        self,
        shards: list[Shard],
        process: SampleProcessor,
        batch: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        max_samples: int,
    ) -> None:
        self.shards, self.process, self.batch = shards, process, batch
        self.batch_size, self.rank, self.world_size, self.max_samples = (
            batch_size,
            rank,
            world_size,
            max_samples,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        streams, me = self.world_size * workers, self.rank * workers + worker
        limit = self.max_samples or math.inf
        shards = [s for s in self.shards if s.offset < limit]
        stats = StreamStats()
        if len(shards) >= streams:  # enough shards: split them (rank-major, then worker)
            samples = read_samples(shards[me::streams], stats, keep=lambda i: i < limit)
        else:  # too few: everyone reads all, keeps every streams-th sample (same order everywhere)
            samples = read_samples(shards, stats, keep=lambda i: i < limit and i % streams == me)
        rng = random.Random(0)  # eval transforms are deterministic; this only satisfies the interface
        good: list[dict[str, Any]] = []
        for group in wds.filters.batched(self.batch_size, collation_fn=None)(samples):
            good += process_all(group, self.process, rng, stats)
            while len(good) >= self.batch_size:
                yield self.batch(good[: self.batch_size], stats.pop())
                good = good[self.batch_size :]
        if good or stats.pending():
            # A final batch even when empty (0 images): it carries the counts of trailing bad samples.
            yield self.batch(good, stats.pop())


class EvalLoader:
    """The finite eval batches of one rank, plus the image ids that all ranks together will visit."""

    def __init__(self, loader: DataLoader, image_ids: list[int]) -> None:
        self.loader, self.image_ids = loader, image_ids

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.loader)


def build_eval_loader(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    split: str | None = None,
    max_samples: int = 0,
) -> EvalLoader:
    """Batches of ``cfg.eval_batch_size`` that visit every sample of the split exactly once over all ranks.

    Shards are split by rank, then worker, when there are at least ranks x workers of them; otherwise
    every stream reads all shards and keeps the samples whose index is its stream id modulo the number of
    streams. No flip, short side ``cfg.test_min_size``, the first caption tokenised (all in ``meta``).
    The last batch of a worker may hold 0 images: it carries that worker's final ``stats``; skip it.

    Args:
        cfg: Data config.
        tokenizer: From :func:`ticod.data.tokenizer.load_tokenizer`.
        rank: This process's rank.
        world_size: Number of ranks.
        split: Shard split; ``cfg.val_split`` when None.
        max_samples: Only the split's first N samples in shard order (0: all); ``image_ids`` lists them.
    """
    shards, manifest = _shards(cfg.shards_dir, split or cfg.val_split)
    process = SampleProcessor(cfg, manifest["categories"], train=False)
    stream = _EvalStream(
        shards,
        process,
        _Batcher(tokenizer, cfg.max_caption_tokens),
        batch_size=cfg.eval_batch_size,
        rank=rank,
        world_size=world_size,
        max_samples=max_samples,
    )
    keys = [k for s in manifest["shards"] for k in s.get("keys", [])]
    limit = max_samples or len(keys)
    return EvalLoader(_data_loader(stream, cfg.num_workers), [int(k) for k in keys[:limit]])
