"""A damaged tar header costs its sample only: with a format-2 manifest the readers go on at the next
sample's byte offset, in training and in evaluation, count the lost sample (``damaged_sample``), and a
resumed training stream stays exact with the same damage before and after the resume point."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import batch_keys, data_cfg

from ticod.data.coco import load_records
from ticod.data.eval_stream import build_eval_loader
from ticod.data.shards import write_shards
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import build_train_loader

DAMAGED_SHARD, DAMAGED_SAMPLE = "train-000001.tar", 4  # the middle shard of 3, in the middle of its 8 samples


def damage_header(shards: Path, split: str, shard: int, sample: int, how: str) -> str:
    """Damage the first tar header of sample ``sample`` of a shard: one flipped byte of its name
    (``byte``) or the whole 512-byte block overwritten (``block``). Returns the sample's key."""
    entry = json.loads((shards / f"{split}-manifest.json").read_text())["shards"][shard]
    path, at = shards / entry["name"], entry["offsets"][sample]
    data = bytearray(path.read_bytes())
    if how == "byte":
        data[at + 3] ^= 0x5A
    else:
        data[at : at + 512] = bytes(range(256)) * 2
    path.write_bytes(bytes(data))
    return entry["keys"][sample]


def tally(batches) -> tuple[list[str], int, Counter]:
    read, bad = 0, Counter()
    for b in batches:
        read += b.stats["read"]
        bad.update(b.stats["bad"])
    return [k for ks in batch_keys(batches) for k in ks], read, bad


@pytest.fixture(scope="module")
def damaged_train(
    demo_shards_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, list[str]]:
    """The demo train split (3 shards x 8) with the header of sample 4 of shard 1 damaged; its key and the
    keys of that shard."""
    out = tmp_path_factory.mktemp("damaged_train")
    shutil.copytree(demo_shards_dir, out, dirs_exist_ok=True)
    shard = json.loads((out / "train-manifest.json").read_text())["shards"][1]
    assert shard["name"] == DAMAGED_SHARD
    lost = damage_header(out, "train", 1, DAMAGED_SAMPLE, "byte")
    return out, lost, shard["keys"]


def test_training_reads_every_other_sample_of_the_damaged_shard(demo_shards_dir: Path, damaged_train) -> None:
    shards, lost, shard_keys = damaged_train
    cfg = data_cfg(shards, "data.num_workers=0", "data.batch_size=2", "data.shuffle_buffer=4")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    batches = list(itertools.islice(build_train_loader(cfg, tok, rank=0, world_size=1, seed=0), 40))
    seen, read, bad = tally(batches)
    assert set(bad) == {"damaged_sample"}  # counted by its reason, once per pass over the shard
    assert lost not in seen
    assert set(shard_keys) - {lost} <= set(seen)  # before: only the samples ahead of the damage
    assert read >= len(seen) + bad["damaged_sample"]


@pytest.mark.parametrize("how", ["byte", "block"])
@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_reads_every_other_image_of_the_damaged_shard(
    demo_coco_dir: Path, demo_shards_dir: Path, tmp_path: Path, how: str, workers: int
) -> None:
    """The 8 demo val images in one shard, the 4th sample's header damaged: the other 7 are evaluated."""
    ann = demo_coco_dir / "annotations"
    records, cats = load_records(ann / "instances_val.json", ann / "captions_val.json")
    write_shards(records, cats, demo_coco_dir / "val", tmp_path, "val", samples_per_shard=8, progress=False)
    lost = damage_header(tmp_path, "val", 0, 3, how)
    cfg = data_cfg(tmp_path, f"data.num_workers={workers}", "data.eval_batch_size=3")
    loader = build_eval_loader(cfg, load_tokenizer(demo_shards_dir / "tokenizer"), rank=0, world_size=1)
    seen, read, bad = tally(list(loader))
    assert sorted(seen) == sorted(k for k in (f"{i:012d}" for i in loader.image_ids) if k != lost)
    assert read == 8 and dict(bad) == {"damaged_sample": 1}


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_stays_exact_with_the_damage_before_and_after_the_resume_point(
    demo_shards_dir: Path, damaged_train, grouped: bool, workers: int
) -> None:
    """The resumed stream seeks by byte offsets past a damaged sample it met before the resume point (and
    meets it again after): it yields the uninterrupted stream's batches and counts."""
    shards, _, _ = damaged_train
    group = f"data.group_by_aspect={str(grouped).lower()}"
    cfg = data_cfg(shards, f"data.num_workers={workers}", "data.batch_size=2", "data.shuffle_buffer=4", group)
    tok = load_tokenizer(demo_shards_dir / "tokenizer")

    def take(n: int, start: int = 0) -> list[dict]:
        loader = build_train_loader(cfg, tok, rank=0, world_size=1, seed=0, start_batch=start)
        return list(itertools.islice(loader, n))

    full = take(40)
    for start in (20, 21):  # resumed on either worker
        assert sum(tally(full[:start])[2].values()) > 0 and sum(tally(full[start:])[2].values()) > 0
        resumed = take(40 - start, start)
        assert batch_keys(resumed) == batch_keys(full[start:])
        assert [b.stats for b in resumed] == [b.stats for b in full[start:]]
        for a, b in zip(full[start:], resumed, strict=True):
            assert torch.equal(a.images, b.images)
