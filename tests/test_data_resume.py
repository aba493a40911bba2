"""A resumed training stream and the data it cannot see (issue 25).

Aspect grouping takes a sample's bucket from the manifest by the sample's index (defect 5): a sample whose
``.json`` member cannot be read (in an intact shard) lands in the same bucket in the live stream and in the
plan a resume seeks by, so the resumed stream is the uninterrupted one's. A shard truncated since the
stream read it, before the resume point, is named at the resume (defect 8)."""

from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import tarfile
from pathlib import Path

from helpers import batch_keys as keys
from helpers import data_cfg

from ticod.data.samples import BAD_JSON
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import aspect_bucket, build_train_loader


def spoil_json(shards: Path, split: str) -> str:
    """Overwrite the ``.json`` member of the first sample whose manifest bucket is not 0 with as many bytes
    that are not JSON (the tar, its offsets and the image stay intact). Returns the sample's key."""
    manifest = json.loads((shards / f"{split}-manifest.json").read_text())
    for entry in manifest["shards"]:
        for key, (w, h) in zip(entry["keys"], entry["sizes"], strict=True):
            if aspect_bucket(w, h) != 0:
                path = shards / entry["name"]
                data = bytearray(path.read_bytes())
                with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
                    member = tar.getmember(f"{key}.json")
                data[member.offset_data : member.offset_data + member.size] = b"\xff" * member.size
                path.write_bytes(bytes(data))
                return key
    raise AssertionError("no sample outside bucket 0 in the demo split")


def test_a_sample_with_an_unreadable_json_keeps_the_grouped_resume_exact(
    demo_shards_dir: Path, tmp_path: Path
):
    shards = shutil.copytree(demo_shards_dir, tmp_path / "shards")
    spoiled = spoil_json(shards, "train")
    cfg = data_cfg(
        shards,
        "data.num_workers=0",
        "data.batch_size=2",
        "data.shuffle_buffer=6",
        "data.group_by_aspect=true",
    )
    tok = load_tokenizer(demo_shards_dir / "tokenizer")

    def take(n: int, start: int = 0) -> list[dict]:
        loader = build_train_loader(cfg, tok, rank=0, world_size=1, seed=3, start_batch=start)
        return list(itertools.islice(loader, n))

    full = take(24)
    # The spoiled sample is drawn (and dropped as bad) in the stretch compared below.
    assert sum(b.stats["bad"].get(BAD_JSON, 0) for b in full) >= 1
    assert spoiled not in {k for ks in keys(full) for k in ks}
    for start in range(1, 12):
        resumed = take(24 - start, start)
        assert keys(resumed) == keys(full[start:]), start
        assert [b.stats for b in resumed] == [b.stats for b in full[start:]], start


def test_a_shard_truncated_before_the_resume_point_is_named_at_the_resume(
    demo_shards_dir: Path, tmp_path: Path, caplog
):
    shards = shutil.copytree(demo_shards_dir, tmp_path / "shards")
    manifest = json.loads((shards / "train-manifest.json").read_text())
    cfg = data_cfg(shards, "data.num_workers=0", "data.batch_size=2", "data.shuffle_buffer=6")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")

    def resume_at(start: int) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ticod.data.train_stream"):
            loader = build_train_loader(cfg, tok, rank=0, world_size=1, seed=3, start_batch=start)
            next(iter(loader))
        return [r.getMessage() for r in caplog.records if "before the resume point" in r.getMessage()]

    assert resume_at(6) == []  # intact shards: nothing to say
    for entry in manifest["shards"]:  # every shard loses its last sample
        with open(shards / entry["name"], "r+b") as f:
            f.truncate(entry["offsets"][-2])
    warned = resume_at(6)
    assert warned and all("is truncated" in m and "train-" in m for m in warned), warned
    assert resume_at(0) == []  # a fresh stream reads the shards and counts what they lost
