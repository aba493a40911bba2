"""Reading shards: the split's shards from its manifest, and sample ranges of one shard (counted as read,
lost ones as bad) for the train and eval streams."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ticod.data.samples import StreamStats
from ticod.data.shards import (
    DAMAGED_SAMPLE,
    TRUNCATED_SHARD,
    UNREADABLE_SHARD,
    iter_shard,
    read_manifest,
    read_samples,
    sample_offsets,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int  # per the manifest
    offset: int  # global index of its first sample in the split
    # Format-2 manifests: byte offset of each sample (then the end), and each image's (width, height).
    byte_offsets: tuple[int, ...] | None = None
    sizes: tuple[tuple[int, int], ...] | None = None
    source: int = 0  # index of its source in the mix (ticod.data.sources)


def split_shards(
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
