"""The training input stream: endless, shuffled, resampled batches per rank, optionally grouped by aspect
ratio, reproducible and seekable for a resume.

The stream is a flat list of stages run inside one dataloader worker (see ``_TrainStream.__iter__``):
draw shards (:mod:`ticod.data.plan`), read them (:mod:`ticod.data.shard_reader`), shuffle, group, process
and collate (:mod:`ticod.data.samples`); the ``DataLoader`` runs with ``batch_size=None``
(:mod:`ticod.data.loader`).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from ticod.config import DataConfig
from ticod.data.loader import data_loader, worker_slot
from ticod.data.plan import StreamPlan, position_after
from ticod.data.samples import Batch, Batcher, SampleProcessor, StreamStats, process_all
from ticod.data.shard_reader import Shard, read_one, read_range, split_shards
from ticod.data.sources import shard_weights
from ticod.data.spec import DataSpec, resolve_data

log = logging.getLogger(__name__)


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


class _TrainStream(IterableDataset):
    """Infinite, shuffled, resampled batches for one rank; reproducible from (seed, rank, worker, start)."""

    def __init__(
        self,
        shards: list[Shard],
        process: SampleProcessor,
        batch: Callable[[list[dict[str, Any]], dict[str, Any]], Batch],
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

    def __iter__(self) -> Iterator[Batch]:
        physical, workers = worker_slot()
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
        seek_s = None  # seconds the seek took, handed out with the first batch (Batch.seek_s)
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
                    batch.seek_s, seek_s = seek_s, None
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
    """Endless training batches of ``cfg.batch_size`` for ``rank`` (the batch format:
    :func:`ticod.data.samples.collate`).

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
        shards += split_shards(src.shards_dir, src.train_split, i, sum(s.samples for s in shards), manifest)[
            0
        ]
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
        Batcher(tokenizer, cfg.max_caption_tokens),
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
    return data_loader(stream, cfg.num_workers, cfg.prefetch_factor)


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
