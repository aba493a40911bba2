"""The evaluation input stream: every sample of a split exactly once across all ranks and workers.

The stream is a flat list of stages run inside one dataloader worker (see ``_EvalStream.__iter__``): read
this stream's share of the split (:func:`eval_share`, :mod:`ticod.data.shard_reader`), batch, process and
collate (:mod:`ticod.data.samples`); the ``DataLoader`` runs with ``batch_size=None``
(:mod:`ticod.data.loader`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from ticod.config import DataConfig
from ticod.data.loader import data_loader, worker_slot
from ticod.data.samples import Batch, Batcher, SampleProcessor, StreamStats, process_all
from ticod.data.shard_reader import Shard, read_range, split_shards

log = logging.getLogger(__name__)


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
        batch: Callable[[list[dict[str, Any]], dict[str, Any]], Batch],
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

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_slot()
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

    def __iter__(self) -> Iterator[Batch]:
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
    shards, manifest = split_shards(shards_dir, split or cfg.val_split)
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
        Batcher(tokenizer, cfg.max_caption_tokens),
        batch_size=cfg.eval_batch_size,
        rank=rank,
        world_size=world_size,
        max_samples=max_samples,
    )
    keys = [k for s in manifest["shards"] for k in s.get("keys", [])]
    limit = max_samples or len(keys)
    return EvalLoader(
        data_loader(stream, cfg.num_workers, cfg.prefetch_factor), [int(k) for k in keys[:limit]]
    )
