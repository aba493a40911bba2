"""Training and evaluation input streams: shards -> samples -> transformed, tokenised, collated batches.

Each stream is a flat list of stages run inside one dataloader worker (see ``_TrainStream.__iter__`` and
``_EvalStream.__iter__``); batches are collated in the worker and the ``DataLoader`` runs with
``batch_size=None``. Collating in the worker is what lets every batch carry ``stats`` (samples read and
skipped by reason in that worker since its previous batch), so the main process can count bad samples
across worker processes; it also moves padding off the training process. Images travel as uint8 pixels
(a quarter of float32's bytes); the model normalises them on its device (``TICOD.normalize``).

Bad data never stops a job: unreadable or truncated shards, malformed members, undecodable JPEGs and
unusable annotations skip the sample and count it by reason in ``stats["bad"]``. Boxes that are dropped
while the sample is kept (zero-size, or outside the image) are counted in ``stats["fixed"]``. Only the
``.jpg`` and ``.json`` members are ever read (no automatic decoding of other extensions, no pickle),
and nothing is extracted to disk.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import multiprocessing
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ticod.config import DataConfig
from ticod.data.coco import CategoryMap
from ticod.data.plan import StreamPlan, position_after
from ticod.data.records import record_tasks
from ticod.data.shards import (
    DAMAGED_SAMPLE,
    TRUNCATED_SHARD,
    UNREADABLE_SHARD,
    iter_shard,
    read_manifest,
    read_samples,
    sample_offsets,
)
from ticod.data.sources import shard_weights
from ticod.data.spec import DataSpec, resolve_data
from ticod.data.tokenizer import encode_captions
from ticod.data.transforms import (
    SizeMismatchError,
    clip_boxes,
    decode_rgb,
    hflip,
    keep_nondegenerate,
    resize,
    swap_left_right,
    to_uint8_tensor,
    xywh_to_xyxy,
)

__all__ = ["EvalLoader", "build_eval_loader", "build_train_loader", "read_manifest"]

log = logging.getLogger(__name__)

# Reasons a sample is skipped (stats["bad"]): a whole shard unreadable (each of its manifest samples counts
# once), samples a damaged or truncated shard did not give, a damaged tar header (that sample only;
# manifests with byte offsets), ...
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
    # Format-2 manifests: byte offset of each sample (then the end), and each image's (width, height).
    byte_offsets: tuple[int, ...] | None = None
    sizes: tuple[tuple[int, int], ...] | None = None
    source: int = 0  # index of its source in the mix (ticod.data.sources)


class StreamStats:
    """Counters of one worker's stream, handed out with each batch and reset."""

    def __init__(self) -> None:
        self.read = 0
        self.bad: Counter[str] = Counter()
        self.fixed: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()  # samples processed per named source (a mix)

    def pop(self) -> dict[str, Any]:
        out = {"read": self.read, "bad": dict(self.bad), "fixed": dict(self.fixed)}
        if self.sources:
            out["sources"] = dict(self.sources)
        self.__init__()
        return out

    def pending(self) -> bool:
        return bool(self.read or self.bad or self.fixed or self.sources)


def _shards(
    shards_dir: str, split: str, source: int = 0, offset: int = 0, manifest: dict[str, Any] | None = None
) -> tuple[list[Shard], dict[str, Any]]:
    """The split's shards (global sample indices from ``offset`` on, tagged with ``source``) and manifest
    (read here unless given)."""
    manifest = manifest if manifest is not None else read_manifest(shards_dir, split)
    shards = []
    for s in manifest["shards"]:
        n, byte_offsets, sizes = int(s["samples"]), sample_offsets(s), s.get("sizes")
        sizes = (
            tuple((int(w), int(h)) for w, h in sizes) if isinstance(sizes, list) and len(sizes) == n else None
        )
        path = str(Path(shards_dir) / s["name"])
        shards.append(Shard(path, n, offset, tuple(byte_offsets) if byte_offsets else None, sizes, source))
        offset += n
    return shards, manifest


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------------------- stages
def _log_member_error(exn: Exception) -> bool:
    log.warning("skipping unreadable shard member: %s", exn)
    return True


def read_range(
    shard: Shard, first: int, stop: int, stats: StreamStats
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(global index, raw sample) for the samples ``first``..``stop - 1`` of ``shard``.

    Every sample of the range counts in ``stats.read``, a lost one also as bad. With byte offsets each
    sample is read from its own offset, and a lost one (damaged header: ``damaged_sample``; past the
    end of a truncated file: ``truncated_shard``; file not openable: ``unreadable_shard``) is handed
    out as ``(index, None)``: the stream keeps the manifest's positions, which is what a resume seeks
    by. Without (format-1 manifests) the shard is read from its start and a damaged header loses the
    rest of it (webdataset's handlers either re-raise or sleep per error, and a truncated tar silently
    drops its rest; comparing with the manifest count makes that visible: ``unreadable_shard`` when no
    sample of the shard can be read, else ``truncated_shard``); lost samples are not handed out.
    """
    if shard.byte_offsets is not None:
        warned: set[str] = set()
        for index, sample, reason in read_samples(shard.path, shard.byte_offsets, first, stop):
            stats.read += 1
            if sample is None:
                assert reason is not None
                stats.bad[reason] += 1
                if reason == DAMAGED_SAMPLE or reason not in warned:
                    log.warning("%s: sample %d lost (%s)", shard.path, index, reason)
                    warned.add(reason)
            else:
                sample["__source__"] = shard.source
            yield shard.offset + index, sample
        return
    n = got = 0  # positions handed out; samples read in this pass
    try:
        it = iter_shard(shard.path, _log_member_error)
        with contextlib.closing(it):
            for sample in it:
                got += 1
                if got <= first:
                    continue
                if n == stop - first:  # more samples than the manifest promises: the manifest rules
                    break
                stats.read += 1
                n += 1
                sample["__source__"] = shard.source
                yield shard.offset + first + n - 1, sample
    except Exception as e:
        log.warning("%s: unreadable or truncated shard after %d samples (%s)", shard.path, first + n, e)
    if n < stop - first:
        stats.read += stop - first - n
        stats.bad[TRUNCATED_SHARD if got > 0 else UNREADABLE_SHARD] += stop - first - n


def read_one(shard: Shard, index: int) -> tuple[int, dict[str, Any] | None]:
    """(global index, raw sample or None) of sample ``index`` of a shard with byte offsets; not counted."""
    assert shard.byte_offsets is not None
    ((_, sample, _),) = read_samples(shard.path, shard.byte_offsets, index, index + 1)
    if sample is not None:
        sample["__source__"] = shard.source
    return shard.offset + index, sample


class SampleProcessor:
    """Raw shard sample -> transformed image, targets, caption text, labelled tasks and meta (raises
    :class:`BadSample`).

    ``categories``: the label space (labels 1..K). ``sources``: per source of the mix, its name and the map
    of its category ids onto the label space's (None: the ids are the label space's).
    """

    def __init__(
        self,
        cfg: DataConfig,
        categories: Sequence[dict[str, Any]],
        *,
        train: bool,
        sources: Sequence[tuple[str, dict[int, int] | None]] = (("", None),),
    ) -> None:
        self.cmap = CategoryMap(categories)
        self.sources = list(sources)
        # Per source: the labels it annotates as a (K + 1,) mask with background, None where it annotates
        # every class (one source; then the target carries no mask and the losses are as without sources).
        self.classes = [self._classes(remap) for _, remap in self.sources]
        self.train = train
        self.min_sizes = [int(s) for s in cfg.train_min_sizes] if train else [int(cfg.test_min_size)]
        self.max_size = int(cfg.max_size)
        self.hflip_prob = float(cfg.hflip_prob) if train else 0.0  # eval never flips

    def _classes(self, remap: dict[int, int] | None) -> torch.Tensor | None:
        if remap is None:
            return None
        labels = {self.cmap.to_label(c) for c in remap.values()}
        if len(labels) == len(self.cmap):
            return None
        mask = torch.zeros(len(self.cmap) + 1, dtype=torch.bool)
        mask[[0, *sorted(labels)]] = True
        return mask

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
        self,
        meta: dict[str, Any],
        width: int,
        height: int,
        stats: StreamStats,
        remap: dict[int, int] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        try:
            boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
            ids = meta["category_ids"] if remap is None else [remap[int(c)] for c in meta["category_ids"]]
            labels = torch.tensor([self.cmap.to_label(c) for c in ids], dtype=torch.int64)
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
        self,
        key: str,
        sample: dict[str, Any],
        rng: random.Random,
        stats: StreamStats,
        min_size: int | None = None,
    ) -> dict[str, Any]:
        """The processed sample; ``min_size``: the short side drawn for its batch (None: drawn here)."""
        meta = self._meta(sample)
        source, remap = self.sources[int(sample.get("__source__", 0))]
        classes = self.classes[int(sample.get("__source__", 0))]
        has_boxes, has_caption = record_tasks(meta)
        if "jpg" not in sample:
            raise BadSample(MISSING_JPEG)
        try:
            image = decode_rgb(sample["jpg"], (int(meta["width"]), int(meta["height"])))
        except SizeMismatchError as e:
            raise BadSample(SIZE_MISMATCH) from e
        except Exception as e:  # PIL raises many types for corrupt data
            raise BadSample(BAD_JPEG) from e
        w, h = image.size
        boxes, labels = self._targets(meta, w, h, stats, remap)
        if min_size is None:
            min_size = rng.choice(self.min_sizes)
        image, boxes = resize(image, boxes, min_size, self.max_size)
        flipped = self.hflip_prob > 0 and rng.random() < self.hflip_prob
        if flipped:
            image, boxes = hflip(image, boxes)
        keep = keep_nondegenerate(boxes)  # tiny boxes can shrink below a pixel when downscaled
        captions = list(meta["captions"]) if has_caption else []
        caption = (rng.choice(captions) if self.train else captions[0]) if captions else ""
        if flipped:
            caption = swap_left_right(caption)
        target = {"boxes": boxes[keep], "labels": labels[keep]}
        if classes is not None:  # a source of a mix that annotates only some classes
            target["classes"] = classes
        return {
            "image": to_uint8_tensor(image),
            "target": target,
            "caption": caption,
            # Which losses this sample takes part in (a sample without box labels is not a negative).
            "tasks": (has_boxes, has_caption),
            "meta": {
                "source": source,
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
    """Processed samples -> the batch dict every consumer relies on (uint8 images zero-padded bottom/right).

    The per-image boxes and labels are views into one tensor each, and ``input_ids``/``attention_mask`` views
    into one: a worker hands every tensor storage to the main process separately (a shared-memory file
    and a descriptor passed over a socket each), so 4 storages per batch instead of 2·B + 3 is what makes
    the transfer cheap (tools/bench/input.py measures it).
    """
    h = max((s["image"].shape[1] for s in samples), default=0)
    w = max((s["image"].shape[2] for s in samples), default=0)
    images = torch.zeros(len(samples), 3, h, w, dtype=torch.uint8)  # normalised by the model, on its device
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
    masks = [s["target"].get("classes") for s in samples]
    if any(m is not None for m in masks):  # a mix with per-source classes: one (B, K + 1) mask, every image
        every = torch.ones_like(next(m for m in masks if m is not None))
        for target, mask in zip(
            targets, torch.stack([every if m is None else m for m in masks]), strict=True
        ):
            target["classes"] = mask
    return {
        "images": images,
        "image_sizes": [tuple(s["image"].shape[1:]) for s in samples],
        "targets": targets,
        "captions": captions,
        # Plain lists: the model indexes its sub-batches with them, no device-to-host read.
        "has_boxes": [bool(s["tasks"][0]) for s in samples],
        "has_caption": [bool(s["tasks"][1]) for s in samples],
        "meta": [s["meta"] for s in samples],
        "stats": stats,
    }


def process_all(
    indexed: Iterable[tuple[int, dict[str, Any] | None]],
    process: SampleProcessor,
    rng: random.Random,
    stats: StreamStats,
    min_size: int | None = None,
) -> list[dict[str, Any]]:
    """Process a group of raw samples, dropping (and counting) the bad ones (``min_size``: see SampleProcessor)."""
    out = []
    for _, sample in indexed:
        if sample is None:  # lost with its shard: counted where it was read
            continue
        key = str(sample.get("__key__", "?"))
        try:
            out.append(process(key, sample, rng, stats, min_size))
            if out[-1]["meta"]["source"]:
                stats.sources[out[-1]["meta"]["source"]] += 1
        except BadSample as e:
            stats.bad[e.args[0]] += 1
            log.warning("skipping sample %s from %s: %s", key, sample.get("__url__"), e.args[0])
    return out


# Aspect-ratio buckets (long side / short side) of each orientation: COCO's photos are mostly 4:3 (1.33),
# 3:2 (1.5) and 16:9 (1.78, its long side then capped by max_size). Split between them, a batch of 8 is
# padded ~3% on COCO; landscape/portrait alone leaves ~13% (tools/bench/padding.py).
ASPECT_EDGES = (1.41, 1.6)


def aspect_bucket(width: int, height: int) -> int:
    """The aspect-ratio bucket of a ``width`` x ``height`` image: landscape (and square) 0-2, portrait 3-5."""
    ratio = max(width, height) / max(1, min(width, height))
    return sum(ratio >= e for e in ASPECT_EDGES) + (len(ASPECT_EDGES) + 1) * (height > width)


def sample_aspect_bucket(item: tuple[int, dict[str, Any]]) -> int:
    """:func:`aspect_bucket` of a raw sample from its ``.json`` (no decode; the annotated size is the size
    of the decoded image, see ``decode_rgb``); 0 when unreadable (processing drops the sample anyway)."""
    try:
        meta = json.loads(item[1]["json"])
        return aspect_bucket(int(meta["width"]), int(meta["height"]))
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return 0


def group_by_aspect(
    items: Iterable[Any], batch_size: int, bucket_of: Callable[[Any], int]
) -> Iterator[list[Any]]:
    """Groups of ``batch_size`` items of one bucket, each handed out when it fills, in stream order
    (detectron2's AspectRatioGroupedDataset). Deterministic: a function of the item sequence alone, so a
    replayed stream regroups identically; at most buckets x (batch_size - 1) items wait."""
    pending: dict[int, list[Any]] = {}
    for item in items:
        group = pending.setdefault(bucket_of(item), [])
        group.append(item)
        if len(group) == batch_size:
            yield group.copy()
            group.clear()


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
        group_by_aspect: bool,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.shards, self.process, self.batch = shards, process, batch
        self.weights = None if weights is None else [float(w) for w in weights]  # shard draw weights (a mix)
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.start_batch = start_batch
        self.group_by_aspect = group_by_aspect
        # Stream seeds: (seed, rank) for a run's first layout, as always; a run that resumed onto another
        # layout (world size, workers, batch size) at optimizer step `origin` draws fresh streams.
        self.key = f"{seed}:{rank}" if origin == 0 else f"{seed}@{origin}:{rank}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, workers = _worker()
        # The DataLoader takes batches from its workers round-robin starting at worker 0, so the rank's
        # batch b comes from worker b % workers. A resumed loader starts at batch start_batch: its
        # worker 0 plays the part of worker start_batch % workers of the uninterrupted run, and so on.
        worker = (physical + self.start_batch) % workers
        # String keys hash with SHA-256 (ticod.data.plan): stable across processes and PYTHONHASHSEED.
        plan = StreamPlan(
            f"ticod-train:{self.key}:{worker}",
            [s.samples for s in self.shards],
            self.shuffle_buffer,
            self.weights,
        )
        stats = StreamStats()
        # Grouped: raw samples, by the size in their .json; else consecutive (no look-ahead, unlike
        # webdataset's batched: a group is handed out the moment it is full, so its stats end there).
        bucket_of = sample_aspect_bucket if self.group_by_aspect else _one_bucket
        if self.group_by_aspect and self.seekable:  # the manifest's sizes, as a seek sees them (lost too)
            bucket_of = self._item_bucket()
        # Of the rank's first start_batch batches this worker made every workers-th one.
        skip = len(range(worker, self.start_batch, workers))
        seek_s = None  # seconds the seek took, handed out with the first batch ("seek_s")
        if skip and self.seekable:
            # Seek: the position after `skip` groups follows from the draws; read only the samples the
            # shuffle buffer and the grouping hold there (their stats were counted before the resume).
            t = time.perf_counter()
            at = position_after(
                plan, skip, self.batch_size, self._bucket_table() if self.group_by_aspect else None
            )
            self._warn_truncated_before(plan, at.next_source)
            buffer, waiting = self._read_at(plan, at.buffer), self._read_at(plan, at.pending)
            seek_s = time.perf_counter() - t
            samples = itertools.chain(waiting, self._shuffled(plan, stats, at.step, at.next_source, buffer))
            groups = group_by_aspect(samples, self.batch_size, bucket_of)
        else:
            groups = group_by_aspect(self._shuffled(plan, stats, 0, 0, None), self.batch_size, bucket_of)
            # Replay (manifests without byte offsets): the skipped groups are read, not decoded.
            for _ in range(skip):
                next(groups)
            stats.pop()
        for index, group in enumerate(groups, start=skip):
            # Transforms draw from a per-group RNG: the skipped groups above never drew from it.
            group_rng = random.Random(f"ticod-augment:{self.key}:{worker}:{index}")
            # Grouped: one scale for the whole batch, else its images differ in size again (padding).
            min_size = group_rng.choice(self.process.min_sizes) if self.group_by_aspect else None
            good = process_all(group, self.process, group_rng, stats, min_size)
            if good:  # an all-bad group (practically never) makes no batch; its stats go with the next
                batch = self.batch(good, stats.pop())
                if seek_s is not None:
                    batch["seek_s"], seek_s = seek_s, None
                yield batch

    @property
    def seekable(self) -> bool:
        """Whether a resume can seek: every shard has byte offsets (and image sizes, to group by)."""
        return all(s.byte_offsets and (s.sizes or not self.group_by_aspect) for s in self.shards)

    def _source(
        self, plan: StreamPlan, stats: StreamStats, position: int
    ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """The endless source from ``position`` on: the drawn shards' readable samples, in order.

        With byte offsets a lost sample keeps its position (``(index, None)``, see :func:`read_range`), so a
        seek lands where the uninterrupted stream stands, damaged or not. Format-1 manifests replay.
        """
        draw, _, first = (int(v[0]) for v in plan.locate(np.array([position])))
        empty_in_a_row, max_empty = 0, 10 + 2 * len(self.shards)
        for j in itertools.count(draw):
            shard = self.shards[plan.shard(j)]
            readable = 0
            for item in read_range(shard, first, shard.samples, stats):
                readable += item[1] is not None
                yield item
            first = 0
            # An endless stream over unreadable data would hang the job instead of failing it.
            empty_in_a_row = 0 if readable else empty_in_a_row + 1
            if empty_in_a_row >= max_empty:
                raise RuntimeError(
                    f"{empty_in_a_row} shards in a row had no readable sample (last: {shard.path})"
                )

    def _shuffled(
        self,
        plan: StreamPlan,
        stats: StreamStats,
        step: int,
        position: int,
        buffer: list[tuple[int, dict[str, Any] | None]] | None,
    ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """webdataset's buffer shuffle with the draws of ``plan`` (see ticod.data.plan), from shuffle step
        ``step`` and source ``position`` on, with ``buffer`` (None: fill it from the source first)."""
        source = self._source(plan, stats, position)
        if buffer is None:
            buffer = list(itertools.islice(source, plan.buffer))
        for e in itertools.count(step):
            pick, new = plan.pick(e), next(source)
            if pick == plan.buffer:
                yield new
            else:
                out, buffer[pick] = buffer[pick], new
                yield out

    def _read_at(self, plan: StreamPlan, positions: np.ndarray) -> list[tuple[int, dict[str, Any] | None]]:
        """The samples at these source positions, read by seeking (in file order; each once)."""
        _, shard, sample = plan.locate(positions)
        wanted = list(zip(shard.tolist(), sample.tolist(), strict=True))
        got = {key: read_one(self.shards[key[0]], key[1]) for key in sorted(set(wanted))}
        return [got[key] for key in wanted]

    def _warn_truncated_before(self, plan: StreamPlan, position: int) -> None:
        """Warn about the shards the stream read before source ``position`` whose files are now shorter than
        their byte offsets say: the seek does not read them again, and the samples of theirs that the
        shuffle buffer holds are lost, so the resumed stream is not the uninterrupted run's."""
        draw = int(plan.locate(np.array([position]))[0][0])
        drawn = sorted({plan.shard(j) for j in range(draw + 1)})
        for shard in (self.shards[i] for i in drawn):
            assert shard.byte_offsets is not None
            size = Path(shard.path).stat().st_size if Path(shard.path).is_file() else 0
            if size < shard.byte_offsets[-1]:
                log.warning(
                    "%s is truncated (%d of %d bytes) and the stream read it before the resume point: what "
                    "the resumed stream takes from it is lost, so it is not the uninterrupted run's",
                    shard.path,
                    size,
                    shard.byte_offsets[-1],
                )

    def _buckets(self) -> np.ndarray:
        """The aspect bucket of each sample (by global index), from the manifest's image sizes."""
        return np.array([aspect_bucket(w, h) for s in self.shards for w, h in s.sizes or ()], dtype=np.int64)

    def _bucket_table(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """(shard index, sample index) arrays -> aspect buckets, from the manifest's image sizes."""
        table = self._buckets()
        starts = np.array([s.offset for s in self.shards], dtype=np.int64)
        return lambda shard, sample: table[starts[shard] + sample]

    def _item_bucket(self) -> Callable[[tuple[int, Any]], int]:
        """(global index, raw sample) -> aspect bucket, from the manifest's image sizes."""
        table = self._buckets().tolist()
        return lambda item: table[item[0]]


def _one_bucket(item: Any) -> int:
    return 0


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
    spec: DataSpec | None = None,
) -> DataLoader:
    """Endless training batches of ``cfg.batch_size`` for ``rank`` (see the module doc for the batch format).

    Every (rank, worker) resamples shards (each sample equally often; a mix: by source weight) and shuffles
    with its own RNG seeded
    from ``(seed, rank, worker)``, so ranks see different data and a run is reproducible. With
    ``cfg.group_by_aspect`` the shuffled samples are grouped into batches of one aspect-ratio bucket
    (:func:`aspect_bucket`), each batch resized to one drawn short side. Resuming:
    ``start_batch`` = batches this rank already consumed; the loader then yields exactly what an
    uninterrupted run would have yielded from that point: it seeks there, reading only what the shuffle
    buffer and the grouping hold (older manifests without byte offsets: it re-reads, without decoding,
    every sample drawn before); exact (damaged samples and shards included) unless a whole group of
    ``batch_size`` samples was unusable. Needs the same seed,
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
        spec: The data as training's setup resolved it (:func:`ticod.data.spec.resolve_data`); resolved
            from ``cfg`` and ``split`` when None.
    """
    del world_size  # resampling needs no partition: each rank draws its own shard sequence
    spec = spec if spec is not None else resolve_data(cfg, split=split)
    sources, manifests, space = spec.sources, spec.manifests, spec.space
    shards: list[Shard] = []
    for i, (src, manifest) in enumerate(zip(sources, manifests, strict=True)):
        shards += _shards(src.shards_dir, src.train_split, i, sum(s.samples for s in shards), manifest)[0]
    remaps = [(src.name, space.to_merged[src.name]) for src in sources]
    process = SampleProcessor(cfg, space.categories, train=True, sources=remaps)
    log_buffer_memory(cfg, {"shards": [s for m in manifests for s in m["shards"]]})
    weights = None  # one source: every shard equally often (StreamPlan's default)
    if len(sources) > 1:
        sizes = [[s.samples for s in shards if s.source == i] for i in range(len(sources))]
        weights = shard_weights(sizes, [src.weight for src in sources]).tolist()
        log.info(
            "training mix: %s",
            ", ".join(
                f"{src.name} {src.weight / sum(x.weight for x in sources):.0%} of samples "
                f"({m['total_samples']} in '{src.train_split}')"
                for src, m in zip(sources, manifests, strict=True)
            ),
        )
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
        group_by_aspect=cfg.group_by_aspect,
        weights=weights,
    )
    if start_batch and not stream.seekable:
        log.warning(
            "%s: the '%s' manifest has no per-sample byte offsets (written before manifest format 2), so "
            "resuming re-reads every sample this rank drew before the checkpoint; rewrite the shards with "
            "tools/shard_coco.py for a resume that seeks",
            ", ".join(src.shards_dir for src in sources),
            ", ".join(src.train_split for src in sources),
        )
    return _data_loader(stream, cfg.num_workers, cfg.prefetch_factor)


def log_buffer_memory(cfg: DataConfig, manifest: dict[str, Any]) -> int:
    """Log (and return) the bytes the shuffle buffers of one rank hold: raw samples (JPEG + JSON) x workers.

    The buffer is set in samples (``data.shuffle_buffer``, per worker); its bytes follow from the split's
    mean sample size on disk. A node holds this times its ranks.
    """
    samples = sum(int(s["samples"]) for s in manifest["shards"])
    mean = sum(int(s.get("bytes", 0)) for s in manifest["shards"]) / max(1, samples)
    held = max(1, cfg.shuffle_buffer) * max(1, cfg.num_workers)
    log.info(
        "shuffle buffer: %d samples x %d workers = %d samples held per rank, ~%.0f MiB at the split's mean "
        "%.0f KiB per sample (times the ranks of a node)",
        max(1, cfg.shuffle_buffer),
        max(1, cfg.num_workers),
        held,
        held * mean / 2**20,
        mean / 2**10,
    )
    return int(held * mean)


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


def _data_loader(stream: IterableDataset, num_workers: int, prefetch_factor: int = 4) -> DataLoader:
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
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False,
    )


# ------------------------------------------------------------------------------------------- eval
def eval_share(
    shards: Sequence[Shard], stream: int, streams: int, limit: int = 0
) -> list[tuple[Shard, int, int]]:
    """The (shard, first, stop) sample ranges that eval stream ``stream`` of ``streams`` reads.

    The split's first ``limit`` samples (0: all), in shard order, cut into ``streams`` contiguous runs
    whose sizes differ by at most one: every sample has exactly one stream, and a stream reads its run
    from its first sample's byte offset on, so the streams together read the split once.
    """
    total = sum(s.samples for s in shards)
    total = min(total, limit) if limit else total
    lo, hi = total * stream // streams, total * (stream + 1) // streams
    out = []
    for s in shards:
        first, stop = max(lo, s.offset), min(hi, s.offset + s.samples)
        if first < stop:
            out.append((s, first - s.offset, stop - s.offset))
    return out


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
        stats = StreamStats()
        share = eval_share(
            self.shards, self.rank * workers + worker, self.world_size * workers, self.max_samples
        )
        samples = (item for shard, first, stop in share for item in read_range(shard, first, stop, stats))
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
    shards_dir: str | None = None,
) -> EvalLoader:
    """Batches of ``cfg.eval_batch_size`` that visit every sample of the split exactly once over all ranks.

    The split is cut into ranks x workers contiguous runs of samples (:func:`eval_share`), each read from
    its byte offset (format-2 manifests; older ones are read from each shard's start). No flip, short side ``cfg.test_min_size``, the first caption tokenised (all in ``meta``).
    The last batch of a worker may hold 0 images: it carries that worker's final ``stats``; skip it.

    Args:
        cfg: Data config.
        tokenizer: From :func:`ticod.data.tokenizer.load_tokenizer`.
        rank: This process's rank.
        world_size: Number of ranks.
        split: Shard split; ``cfg.val_split`` when None.
        max_samples: Only the split's first N samples in shard order (0: all); ``image_ids`` lists them.
        shards_dir: Where the split is; ``cfg.shards_dir`` when None (a source of a mix: its own dir).
    """
    shards_dir = shards_dir or cfg.shards_dir
    shards, manifest = _shards(shards_dir, split or cfg.val_split)
    process = SampleProcessor(cfg, manifest["categories"], train=False)
    if world_size * max(1, cfg.num_workers) > 1 and not all(s.byte_offsets for s in shards):
        log.warning(
            "%s: the '%s' manifest has no per-sample byte offsets (manifest format 1): each eval stream reads "
            "its shards from their start; rewrite the shards with tools/shard_coco.py to read each byte once",
            shards_dir,
            split or cfg.val_split,
        )
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
    return EvalLoader(
        _data_loader(stream, cfg.num_workers, cfg.prefetch_factor), [int(k) for k in keys[:limit]]
    )
