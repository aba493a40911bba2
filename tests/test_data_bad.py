"""Bad data never crashes the loaders: each bad sample is skipped and counted by reason in batch stats."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import batch_keys, shard_samples, tar_bytes

from ticod.config import load_config
from ticod.data.eval_stream import build_eval_loader
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import build_train_loader

MAX_TOKENS = 12


class _OpensFile:
    """Unpickling this creates ``path``: proof that a ``.pkl`` member was (wrongly) decoded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def bad_dir(demo_shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards: one of odd samples, one truncated, one garbage; plus the pickle marker path."""
    out = tmp_path_factory.mktemp("bad_shards")
    (jpg, rec), (jpg2, _), _ = shard_samples(demo_shards_dir / "val-000000.tar")
    w = rec["width"]

    def record(key: int, **changes) -> bytes:
        return json.dumps({**rec, "image_id": key, **changes}).encode()

    boxes = [[-50, -50, 20, 20], [10, 10, 0, 5], [w + 10, 5, 20, 20], [5, 5, 30, 30]]
    odd = [
        ("000000000001.jpg", jpg), ("000000000001.json", record(1)),  # good
        ("000000000002.jpg", b"\xff\xd8\xff\xe0garbage" * 30), ("000000000002.json", record(2)),  # corrupt jpeg
        ("000000000003.jpg", jpg),  # no json
        ("000000000004.jpg", jpg), ("000000000004.json", b'{"image_id": 4, "boxes": [['),  # malformed json
        ("000000000005.jpg", jpg),  # outside / zero-size boxes: 1 degenerate, 2 outside, 1 kept
        ("000000000005.json", record(5, boxes=boxes, category_ids=[1, 3, 7, 8], iscrowd=[0] * 4)),
        ("000000000006.jpg", jpg), ("000000000006.json", record(6, boxes=[], category_ids=[], iscrowd=[])),
        ("000000000007.jpg", jpg), ("000000000007.json", record(7, captions=["word " * 5000])),
        ("000000000008.jpg", jpg), ("000000000008.json", record(8)),  # with a pickle member
        ("000000000008.pkl", pickle.dumps(_OpensFile(str(out / "unpickled")))),
        ("000000000009.jpg", jpg), ("000000000009.json", record(9, category_ids=[2] * len(rec["boxes"]))),
        ("000000000010.jpg", jpg2), ("000000000010.json", record(10)),  # image size != annotation
    ]  # fmt: skip
    (out / "bad-000000.tar").write_bytes(tar_bytes(odd))
    three = tar_bytes(
        [
            (f"00000000002{i}.{ext}", d)
            for i in range(3)
            for ext, d in (("jpg", jpg), ("json", record(20 + i)))
        ]
    )
    with tarfile.open(fileobj=io.BytesIO(three)) as tar:
        cut = tar.getmembers()[2].offset_data + 100  # inside the second sample's JPEG
    (out / "bad-000001.tar").write_bytes(three[:cut])
    (out / "bad-000002.tar").write_bytes(b"this is not a tar file at all" * 100)
    shards = [{"name": f"bad-00000{i}.tar", "samples": n, "bytes": 0} for i, n in enumerate([10, 3, 3])]
    categories = [{"id": i, "name": str(i), "supercategory": ""} for i in (1, 3, 7, 8, 11, 13)]
    manifest = {"split": "bad", "shards": shards, "total_samples": 16, "categories": categories}
    (out / "bad-manifest.json").write_text(json.dumps(manifest))
    return out


def drain(loader) -> tuple[list[dict], int, Counter, Counter]:
    batches, read, bad, fixed = [], 0, Counter(), Counter()
    for b in loader:
        batches.append(b)
        read += b.stats["read"]
        bad.update(b.stats["bad"])
        fixed.update(b.stats["fixed"])
    return batches, read, bad, fixed


EXPECTED_BAD = {
    "bad_jpeg": 1,
    "missing_json": 1,
    "bad_json": 1,
    "bad_annotation": 1,
    "size_mismatch": 1,
    "truncated_shard": 2,  # the second sample broke mid-JPEG; the third never came
    "unreadable_shard": 3,
}


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_skips_and_counts_every_bad_sample(bad_dir: Path, demo_shards_dir: Path, workers: int) -> None:
    overrides = [f"data.shards_dir={bad_dir}", f"data.num_workers={workers}", "data.eval_batch_size=3"]
    cfg = load_config(overrides=[*overrides, f"data.max_caption_tokens={MAX_TOKENS}"]).data
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    batches, read, bad, fixed = drain(build_eval_loader(cfg, tok, rank=0, world_size=1, split="bad"))
    assert read == 16
    assert dict(bad) == EXPECTED_BAD
    assert dict(fixed) == {"degenerate_box": 1, "box_outside_image": 2}
    good = {m["image_id"]: (b, i) for b in batches for i, m in enumerate(b.meta)}
    assert sorted(good) == [1, 5, 6, 7, 8, 20]
    b, i = good[5]
    assert b.targets[i]["boxes"].shape == (1, 4) and b.targets[i]["labels"].tolist() == [4]
    b, i = good[6]
    assert b.targets[i]["boxes"].shape == (0, 4) and b.targets[i]["labels"].shape == (0,)
    b, i = good[7]
    row = b.captions["input_ids"][i]
    assert (
        int(b.captions["attention_mask"][i].sum()) == MAX_TOKENS and row[MAX_TOKENS - 1] == tok.eos_token_id
    )
    assert not (bad_dir / "unpickled").exists()  # the .pkl member was never unpickled


def test_train_stream_survives_bad_shards(bad_dir: Path, demo_shards_dir: Path) -> None:
    overrides = [
        f"data.shards_dir={bad_dir}",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.shuffle_buffer=4",
    ]
    cfg = load_config(overrides=overrides).data
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    batches, read, bad, _ = drain(
        itertools.islice(build_train_loader(cfg, tok, rank=0, world_size=1, seed=0, split="bad"), 30)
    )
    ids = {m["image_id"] for b in batches for m in b.meta}
    assert ids <= {1, 5, 6, 7, 8, 20} and len(ids) >= 4
    assert set(bad) <= set(EXPECTED_BAD) and sum(bad.values()) > 0
    assert read >= sum(len(b.meta) for b in batches) + sum(bad.values())
    assert all(torch.isfinite(b.images).all() for b in batches)


def test_train_stream_over_only_unreadable_shards_fails_instead_of_hanging(
    bad_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "junk-000000.tar").write_bytes((bad_dir / "bad-000002.tar").read_bytes())
    manifest = json.loads((bad_dir / "bad-manifest.json").read_text())
    manifest["shards"] = [{"name": "junk-000000.tar", "samples": 3, "bytes": 0}]
    (tmp_path / "junk-manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(overrides=[f"data.shards_dir={tmp_path}", "data.num_workers=0"]).data
    with pytest.raises(RuntimeError, match="12 shards in a row had no readable sample"):
        next(iter(build_train_loader(cfg, None, rank=0, world_size=1, seed=0, split="junk")))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_train_stream_counts_what_the_uninterrupted_one_counts(
    bad_dir: Path, demo_shards_dir: Path, tmp_path: Path, workers: int
) -> None:
    """A demo train shard plus the odd, the truncated and the garbage shard: a stream resumed at batch N
    yields the uninterrupted stream's batches from N on with the same ``stats`` (read, bad, fixed), so a
    resumed run counts each sample read and each bad one once.
    """
    shards = []
    for source, split, n in ((demo_shards_dir, "train", 1), (bad_dir, "bad", 3)):
        manifest = json.loads((source / f"{split}-manifest.json").read_text())
        for shard in manifest["shards"][:n]:
            shutil.copy(source / shard["name"], tmp_path / shard["name"])
            shards.append(shard)
    mixed = {"split": "mixed", "shards": shards, "total_samples": sum(s["samples"] for s in shards)}
    mixed["categories"] = manifest["categories"]  # the same in both
    (tmp_path / "mixed-manifest.json").write_text(json.dumps(mixed))
    overrides = [f"data.shards_dir={tmp_path}", "data.batch_size=3", "data.shuffle_buffer=6"]
    cfg = load_config(overrides=[*overrides, f"data.num_workers={workers}"]).data
    tok = load_tokenizer(demo_shards_dir / "tokenizer")

    def take(n: int, start: int = 0) -> list[dict]:
        # Seed 1: its streams draw the truncated and the garbage shard in the first batches, and (as the
        # resume needs, see build_train_loader) no group of them is entirely bad.
        loader = build_train_loader(cfg, tok, rank=0, world_size=1, seed=1, start_batch=start, split="mixed")
        return list(itertools.islice(loader, n))

    full = take(12)
    _, _, bad, _ = drain(full)
    assert {"unreadable_shard", "truncated_shard", "bad_jpeg"} <= set(bad)  # the bad shards were drawn
    for start in (5, 6):  # resumed on either worker
        resumed = take(12 - start, start)
        assert batch_keys(resumed) == batch_keys(full[start:])
        assert [b.stats for b in resumed] == [b.stats for b in full[start:]]
