"""Write per-image COCO records + original JPEG bytes into WebDataset tar shards, and read them back.

Layout: ``DIR/{split}-000000.tar ...`` plus ``DIR/{split}-manifest.json``. A sample is ``<key>.jpg`` (the
source JPEG bytes, untouched) and ``<key>.json`` (the record of :func:`ticod.data.coco.load_records`),
with ``key`` the zero-padded image id. The record's ``tasks`` says what the image is labelled for (boxes
and/or captions, see :mod:`ticod.data.records`): instances-only, captions-only and mixed sets all shard, and
the manifest counts each kind (``tasks``). Tar headers carry no times or owners and samples are written
in image-id order from the main process, so the same input gives byte-identical shards whatever the
number of worker processes. The manifest is written last: a directory without one is an unfinished run.

Manifest format 2 also lists, per shard, where each sample lies in the tar (``offsets``: the byte offset
of each sample's first header, then the end of the last sample) and where its ``.json`` member's bytes
are (``json``: ``[offset, size]`` per sample), and each image's annotated ``[width, height]`` (``sizes``:
what batching by aspect ratio needs, without reading the sample). Readers then seek: a resumed training stream jumps to its
position, an eval stream reads only its own samples, the ground truth reads only the ``.json`` bytes.
Each sample is parsed from its own bytes (:func:`read_samples`), so a damaged tar header costs that
sample only, not the rest of its shard.
Format 1 manifests (without them) still work; those readers then read shards from their start.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ticod.data.records import coco_ground_truth, record_tasks, task_list

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 2  # 2: per-sample byte offsets (see the module doc)
SAMPLE_SUFFIXES = ("jpg", "json")  # the only members we write, and the only ones readers look at
# Box-labelled images without captions: keep as boxes-only samples, skip (counted) or fail.
MISSING_CAPTIONS = ("keep", "skip", "error")
# What a written sample is labelled for, as counted in the summary and the manifest's "tasks".
LABEL_KINDS = ("boxes+captions", "boxes", "captions")
UNLABELLED = (
    "none"  # samples of a split without labels (write_shards(unlabelled=True)): predicted, not scored
)
# Skip reasons, as counted in the summary and the manifest.
MISSING_IMAGE = "missing image file"
UNREADABLE = "unreadable JPEG"
NOT_JPEG = "not a JPEG file"
NO_CAPTIONS = "no captions"
NO_LABELS = "no labels"


class ShardError(RuntimeError):
    """Shard writing cannot go on (existing output, --strict failure, empty result)."""


def label_kind(has_boxes: bool, has_caption: bool) -> str | None:
    """The :data:`LABEL_KINDS` entry of a record's :func:`~ticod.data.records.record_tasks`; None: no labels."""
    return "+".join(task_list(has_boxes, has_caption)) or None


def sample_key(image_id: int) -> str:
    return f"{int(image_id):012d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_path(shards_dir: str | Path, split: str) -> Path:
    return Path(shards_dir) / f"{split}-manifest.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------- writing
@dataclass
class Prepared:
    """One record after the worker looked at its image: the sample to write, or why it is skipped."""

    key: str
    jpg: bytes | None = None
    meta: bytes | None = None
    skip: str | None = None  # reason
    detail: str = ""


# How shard_coco.py checks each JPEG before packing it (--verify).
VERIFY_MODES = ("decode", "header")
_EOI = b"\xff\xd9"  # JPEG end-of-image marker


def check_jpeg(data: bytes, verify: str = "decode") -> str | None:
    """None if ``data`` passes the check, else the skip reason.

    ``decode``: a draft (DCT-scaled) decode makes libjpeg read every segment and the whole entropy-coded
    stream at a fraction of a full decode's cost (~1,800 images/s per core on COCO-sized images), so
    truncated files and broken tables fail. ``header``: the headers parse as a JPEG and the end-of-image
    marker is in the last KiB: catches non-JPEGs and truncated files ~3x faster; what only a decode finds
    shows at training time, where the loader skips and counts the sample (``bad_jpeg``). Either way
    libjpeg tolerates (with a warning) some damage inside the compressed data, as training does.
    Grayscale and CMYK JPEGs pass unchanged.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return NOT_JPEG
            if verify == "header":
                return None if _EOI in data[-1024:] else UNREADABLE
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception:
        return UNREADABLE
    return None


def prepare(
    record: dict[str, Any],
    images_dir: str,
    missing_captions: str,
    verify: str = "decode",
    unlabelled: bool = False,
) -> Prepared:
    """Read and check one image (runs in worker processes)."""
    key = sample_key(record["image_id"])
    has_boxes, has_caption = record_tasks(record)
    if not has_boxes and not has_caption and not unlabelled:
        return Prepared(key, skip=NO_LABELS, detail=f"image {record['image_id']}")
    if has_boxes and not has_caption and missing_captions != "keep":
        return Prepared(key, skip=NO_CAPTIONS, detail=f"image {record['image_id']}")
    path = Path(images_dir) / record["file_name"]
    try:
        data = path.read_bytes()
    except OSError as e:
        return Prepared(key, skip=MISSING_IMAGE, detail=f"{path}: {e.strerror or e}")
    reason = check_jpeg(data, verify)
    if reason is not None:
        return Prepared(key, skip=reason, detail=str(path))
    # Written normalised, so readers see tasks also for records made before they existed.
    record = {**record, "tasks": task_list(has_boxes, has_caption)}
    meta = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return Prepared(key, jpg=data, meta=meta)


class _ShardFile:
    """A tar written to ``name.tmp`` and renamed when complete, with reproducible headers."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        # Held open across add() calls; closed in close() (or by write_shards on failure).
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.keys: list[str] = []
        self.offsets: list[int] = []  # where each sample's first header starts
        self.json: list[list[int]] = []  # [offset, size] of each sample's .json bytes
        self.sizes: list[list[int]] = []  # [width, height] of each sample's image (from its record)
        self.size = 2 * tarfile.BLOCKSIZE  # end-of-archive blocks

    @staticmethod
    def member_size(n: int) -> int:
        return tarfile.BLOCKSIZE + -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    def add(self, key: str, members: Sequence[tuple[str, bytes]], size: tuple[int, int]) -> None:
        self.offsets.append(self.tar.offset)
        self.sizes.append([int(size[0]), int(size[1])])
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            if suffix == "json":  # short USTAR names: one header block, then the data
                self.json.append([self.tar.offset + tarfile.BLOCKSIZE, len(data)])
            self.tar.addfile(info, io.BytesIO(data))
            self.size += self.member_size(len(data))
        self.keys.append(key)

    def close(self) -> dict[str, Any]:
        end = self.tar.offset
        self.tar.close()
        os.replace(self.tmp, self.path)
        return {
            "name": self.path.name,
            "samples": len(self.keys),
            "bytes": self.path.stat().st_size,
            "sha256": sha256_file(self.path),
            "keys": self.keys,
            "offsets": [*self.offsets, end],
            "json": self.json,
            "sizes": self.sizes,
        }


@dataclass
class ShardSummary:
    images: int = 0
    boxes: int = 0
    crowd_boxes: int = 0
    captions: int = 0
    empty_images: int = 0  # box-labelled images without boxes (negatives)
    shards: int = 0
    bytes: int = 0
    tasks: Counter = field(default_factory=Counter)  # written samples per LABEL_KINDS entry
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # one example per skip reason

    def text(self) -> str:
        lines = [
            f"images written: {self.images} in {self.shards} shards ({self.bytes / 2**20:.1f} MiB)",
            f"labels: {self.tasks['boxes+captions']} boxes+captions, {self.tasks['boxes']} boxes only, "
            f"{self.tasks['captions']} captions only, {self.tasks[UNLABELLED]} without labels",
            f"boxes: {self.boxes} ({self.crowd_boxes} crowd), images without boxes (negatives): "
            f"{self.empty_images}",
            f"captions: {self.captions}",
            f"skipped: {sum(self.skipped.values())}",
        ]
        lines += [
            f"  {reason}: {n} (e.g. {self.examples[reason]})" for reason, n in sorted(self.skipped.items())
        ]
        return "\n".join(lines)


def existing_outputs(out_dir: str | Path, split: str) -> list[Path]:
    """Files of an earlier run for ``split`` in ``out_dir`` (shards, partial shards, manifest)."""
    out = Path(out_dir)
    found = [*out.glob(f"{split}-[0-9]*.tar"), *out.glob(f"{split}-[0-9]*.tar.tmp")]
    if manifest_path(out, split).exists():
        found.append(manifest_path(out, split))
    return sorted(found)


def write_shards(
    records: Sequence[dict[str, Any]],
    categories: Sequence[dict[str, Any]],
    images_dir: str | Path,
    out_dir: str | Path,
    split: str,
    *,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 0,
    workers: int = 1,
    strict: bool = False,
    missing_captions: str = "keep",
    overwrite: bool = False,
    sources: dict[str, Any] | None = None,
    progress: bool = True,
    verify: str = "decode",
    dataset: str = "",
    unlabelled: bool = False,
) -> tuple[dict[str, Any], ShardSummary]:
    """Write ``records`` (sorted by image id) as shards + manifest into ``out_dir``.

    Args:
        records: Per-image records from :func:`ticod.data.coco.load_records`.
        categories: The dataset's category list (id, name, supercategory), stored in the manifest.
        images_dir: Directory holding each record's ``file_name``.
        out_dir: Output directory (created).
        split: Shard name prefix.
        samples_per_shard: Start a new shard after this many samples.
        max_shard_bytes: Also start a new shard before exceeding this size (0: no limit).
        workers: Processes reading and checking images; output order does not depend on it.
        strict: Fail on the first missing/unreadable image instead of skipping it.
        missing_captions: Box-labelled images without captions: "keep" (boxes-only samples), "skip"
            (counted) or "error". Records with no labels at all are skipped and counted ("no labels").
        overwrite: Remove an earlier run's files for ``split`` first, instead of refusing.
        sources: Provenance stored in the manifest (annotation files and their sha256).
        progress: Show a tqdm progress bar.
        verify: JPEG check before packing, "decode" or "header" (see :func:`check_jpeg`).
        dataset: The dataset's public name (model cards), stored in the manifest when given.
        unlabelled: Keep records labelled for nothing (a test split: predicted, not scored) instead of
            skipping them.

    Returns:
        The manifest (as written) and a summary.

    Raises:
        ShardError: output exists without ``overwrite``, a ``strict``/"error" policy failure, or nothing to write.
    """
    if missing_captions not in MISSING_CAPTIONS:
        raise ValueError(f"missing_captions must be one of {MISSING_CAPTIONS}, got {missing_captions!r}")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = existing_outputs(out, split)
    if old and not overwrite:
        raise ShardError(
            f"{out} already has {len(old)} file(s) of split '{split}' (e.g. {old[0].name}); "
            "mixing runs would corrupt the dataset: pass --overwrite to replace them, or use another --out"
        )
    for path in old:
        path.unlink()
    if missing_captions == "error":
        bad = next((r for r in records if record_tasks(r) == (True, False)), None)
        if bad is not None:
            raise ShardError(
                f"image {bad['image_id']} ({bad['file_name']}) has no captions (--missing-captions error)"
            )

    summary = ShardSummary()
    shards: list[dict[str, Any]] = []
    current: _ShardFile | None = None
    work = partial(
        prepare,
        images_dir=str(images_dir),
        missing_captions=missing_captions,
        verify=verify,
        unlabelled=unlabelled,
    )
    # fork where available: spawned workers would each re-import torch (via webdataset) for seconds.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers) if workers > 1 else None
    try:
        # imap keeps input order, so the shards are identical for any number of workers.
        results = pool.imap(work, records, chunksize=8) if pool else map(work, records)
        bar = tqdm(
            zip(records, results, strict=True),
            total=len(records),
            desc=f"shard {split}",
            disable=not progress,
        )
        for record, prep in bar:
            if prep.skip is not None:
                if strict:
                    raise ShardError(f"{prep.skip}: {prep.detail} (--strict)")
                summary.skipped[prep.skip] += 1
                summary.examples.setdefault(prep.skip, prep.detail)
                continue
            assert prep.jpg is not None and prep.meta is not None
            members = [("jpg", prep.jpg), ("json", prep.meta)]
            grow = sum(_ShardFile.member_size(len(d)) for _, d in members)
            if current is not None and (
                len(current.keys) >= samples_per_shard
                or (max_shard_bytes and current.keys and current.size + grow > max_shard_bytes)
            ):
                shards.append(current.close())
                current = None
            if current is None:
                current = _ShardFile(out / shard_name(split, len(shards)))
            current.add(prep.key, members, (record["width"], record["height"]))
            has_boxes, has_caption = record_tasks(record)
            summary.images += 1
            summary.tasks[label_kind(has_boxes, has_caption) or UNLABELLED] += 1
            summary.boxes += len(record["boxes"])
            summary.crowd_boxes += sum(record["iscrowd"])
            summary.captions += len(record["captions"])
            summary.empty_images += has_boxes and not record["boxes"]
        if current is not None:
            shards.append(current.close())
            current = None
    finally:
        if pool is not None:
            pool.terminate()
        if current is not None:  # failed mid-shard: leave no partial tar behind
            current.tar.close()
            current.tmp.unlink(missing_ok=True)
    if not shards:
        raise ShardError(f"no samples written for split '{split}':\n{summary.text()}")
    summary.shards = len(shards)
    summary.bytes = sum(s["bytes"] for s in shards)
    manifest = {
        "format": MANIFEST_FORMAT,
        "split": split,
        "shards": shards,
        "total_samples": summary.images,
        "categories": [dict(c) for c in categories],
        "num_boxes": summary.boxes,
        "num_crowd_boxes": summary.crowd_boxes,
        "num_captions": summary.captions,
        "tasks": {
            k: summary.tasks[k] for k in (*LABEL_KINDS, UNLABELLED) if k in LABEL_KINDS or summary.tasks[k]
        },
        "skipped": dict(sorted(summary.skipped.items())),
        "sources": sources or {},
        **({"dataset": dataset} if dataset else {}),
        "jpeg_check": verify,
        "created_by": "tools/shard_coco.py",
    }
    tmp = manifest_path(out, split).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path(out, split))
    return manifest, summary


# -------------------------------------------------------------------------------------- reading
def read_manifest(shards_dir: str | Path, split: str) -> dict[str, Any]:
    """The manifest of ``split`` in ``shards_dir``; FileNotFoundError says how to make one."""
    path = manifest_path(shards_dir, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"no shard manifest {path}: write the '{split}' shards with tools/shard_coco.py --split {split}"
        )
    manifest = json.loads(path.read_text())
    for key in ("shards", "total_samples", "categories"):
        if key not in manifest:
            raise ValueError(f"{path}: not a shard manifest (missing key '{key}')")
    return manifest


def shard_paths(shards_dir: str | Path, split: str) -> list[str]:
    """Paths of the split's shards, in manifest (= image id) order."""
    return [str(Path(shards_dir) / s["name"]) for s in read_manifest(shards_dir, split)["shards"]]


def _select(name: str) -> bool:
    # Only our own members are read at all: other suffixes (.pkl, .pth, ...) never reach a decoder.
    return name.rsplit(".", 1)[-1].lower() in SAMPLE_SUFFIXES


def iter_shard(path: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Samples ``{"__key__", "jpg"?, "json"?}`` of one local tar shard, read from its start into memory
    (never extracted): for manifests without byte offsets (format 1).

    Per-member errors go to ``handler``; an unreadable or truncated archive raises out of the iterator
    (after yielding the samples before the damage), so the caller can count what was lost.
    """
    errors: list[Exception] = []

    def members(f: Any) -> Iterator[dict[str, Any]]:
        # Stop quietly at damage so group_by_keys still hands out the last complete sample it holds.
        try:
            for m in tar_file_iterator(f, handler=handler, select_files=_select):
                yield {**m, "__url__": path}
        except Exception as e:
            errors.append(e)

    with open(path, "rb") as f:
        yield from group_by_keys(members(f), handler=handler)
    if errors:
        raise errors[0]


# Why a sample of a shard with byte offsets is lost (read_samples); the loaders count it under this reason.
UNREADABLE_SHARD = "unreadable_shard"  # the file cannot be opened: each of its samples counts once
TRUNCATED_SHARD = "truncated_shard"  # the sample's bytes end past the end of the file
DAMAGED_SAMPLE = "damaged_sample"  # its bytes are not whole tar members of one key (a damaged header)


def parse_sample(data: bytes, url: str) -> dict[str, Any] | None:
    """The sample ``{"__key__", "__url__", "jpg"?, "json"?}`` in one sample's tar bytes; None unless they
    are whole tar members (headers intact, through the last byte) of one key. Regular members only."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            infos = tar.getmembers()  # stops without raising at a damaged header after the first
            if tar.offset != len(data):
                return None
            files = [
                {"fname": m.name, "data": tar.extractfile(m).read(), "__url__": url}  # type: ignore[union-attr]
                for m in infos
                if m.isreg() and _select(m.name)
            ]
        samples = list(group_by_keys(iter(files)))
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return None
    return samples[0] if len(samples) == 1 else None


def read_samples(
    path: str, offsets: Sequence[int], first: int, stop: int
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Samples ``first``..``stop - 1`` of a shard with byte ``offsets`` (a format-2 manifest's), each read
    from its own bytes: ``(index, sample, None)``, or ``(index, None, reason)`` for a lost one
    (:data:`UNREADABLE_SHARD`, :data:`TRUNCATED_SHARD`, :data:`DAMAGED_SAMPLE`). A damaged header thus
    costs its own sample only: the next is read from its offset."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; `open` is looked up here so tests can count reads)
    except OSError:
        for i in range(first, stop):
            yield i, None, UNREADABLE_SHARD
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        for i in range(first, stop):
            start, end = offsets[i], offsets[i + 1]
            if end > size:
                yield i, None, TRUNCATED_SHARD
                continue
            f.seek(start)
            sample = parse_sample(f.read(end - start), path)
            yield i, sample, None if sample is not None else DAMAGED_SAMPLE


def sample_offsets(shard: dict[str, Any]) -> list[int] | None:
    """A manifest shard's sample offsets (``samples`` + 1 of them), or None (format 1, or inconsistent)."""
    offsets = shard.get("offsets")
    if not isinstance(offsets, list) or len(offsets) != int(shard["samples"]) + 1:
        return None
    return [int(o) for o in offsets]


def iter_shard_records(shards_dir: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """The decoded ``.json`` record of every readable sample of a split, in shard order.

    With a format-2 manifest only the ``.json`` bytes are read (a seek and a read each); the JPEGs are
    never touched. Older manifests: each shard is read through.
    """

    def warn(exn: Exception) -> bool:
        log.warning("skipping unreadable shard member: %s", exn)
        return True

    for shard in read_manifest(shards_dir, split)["shards"]:
        path = str(Path(shards_dir) / shard["name"])
        spans = shard.get("json")
        if isinstance(spans, list) and len(spans) == int(shard["samples"]):
            yield from _json_members(path, spans)
            continue
        try:
            for sample in iter_shard(path, warn):
                try:
                    yield json.loads(sample["json"])
                except (KeyError, ValueError) as e:
                    log.warning("%s: sample %s has no readable .json (%s)", path, sample.get("__key__"), e)
        except (OSError, tarfile.TarError, EOFError) as e:
            log.warning("%s: unreadable or truncated shard, the rest of it is skipped (%s)", path, e)


def _json_members(path: str, spans: Sequence[Sequence[int]]) -> Iterator[dict[str, Any]]:
    if not Path(path).is_file():
        log.warning("%s: missing shard, skipped", path)
        return
    with open(path, "rb") as f:
        for offset, size in spans:
            f.seek(int(offset))
            data = f.read(int(size))
            try:
                yield json.loads(data)
            except ValueError as e:  # a truncated or damaged shard
                log.warning("%s: the .json at byte %d is not readable (%s)", path, offset, e)


def ground_truth_from_shards(
    shards_dir: str | Path, split: str
) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """COCO ground truth (instances dict, image id -> captions) rebuilt from a split's shards.

    Reads only the ``.json`` members; unreadable ones are skipped (the eval loader counts them as bad).
    """
    manifest = read_manifest(shards_dir, split)
    return coco_ground_truth(iter_shard_records(shards_dir, split), manifest["categories"])
