"""ticod.data train and eval streams (train_stream, eval_stream, shard_reader, samples): round trip against pycocotools, batch format, rank/worker splitting, resume."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import batch_keys, data_cfg
from pycocotools.coco import COCO
from torch.utils.data._utils.pin_memory import pin_memory

from ticod.data import shards as shards_module
from ticod.data.coco import CategoryMap, load_records
from ticod.data.eval_stream import build_eval_loader, eval_share
from ticod.data.samples import Batch, SampleProcessor, StreamStats
from ticod.data.shard_reader import read_range, split_shards
from ticod.data.shards import write_shards
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import build_train_loader, log_buffer_memory
from ticod.data.transforms import resize_size, swap_left_right


def quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def expected_targets(inst: COCO, image_id: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loader must yield for an image: pycocotools' non-crowd boxes, resized, labels 1..K."""
    cmap = CategoryMap(inst.loadCats(inst.getCatIds()))
    info = inst.loadImgs(image_id)[0]
    h, w = info["height"], info["width"]
    anns = [a for a in inst.loadAnns(inst.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w) * (size[1] / w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h) * (size[0] / h)
    labels = torch.tensor([cmap.to_label(a["category_id"]) for a in anns], dtype=torch.int64)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    return boxes[keep], labels[keep]


def test_eval_round_trip_matches_pycocotools(demo_coco_dir: Path, demo_shards_dir: Path) -> None:
    cfg = data_cfg(demo_shards_dir, "data.num_workers=0", "data.eval_batch_size=3")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    inst = quiet_coco(demo_coco_dir / "annotations/instances_val.json")
    caps = quiet_coco(demo_coco_dir / "annotations/captions_val.json")
    loader = build_eval_loader(cfg, tok, rank=0, world_size=1)
    assert loader.image_ids == sorted(inst.getImgIds())
    seen, crowd_images = [], 0
    for batch in loader:
        for i, meta in enumerate(batch.meta):
            image_id = meta["image_id"]
            seen.append(image_id)
            info = inst.loadImgs(image_id)[0]
            assert meta["orig_size"] == (info["height"], info["width"]) and not meta["flipped"]
            size = resize_size(info["height"], info["width"], 112, 160)
            assert tuple(batch.image_sizes[i]) == size
            boxes, labels = expected_targets(inst, image_id, size)
            torch.testing.assert_close(batch.targets[i]["boxes"], boxes)
            assert torch.equal(batch.targets[i]["labels"], labels)
            refs = [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=image_id))]
            assert sorted(meta["captions"]) == sorted(refs) and len(refs) == 5
            crowd_images += any(a["iscrowd"] for a in inst.loadAnns(inst.getAnnIds(imgIds=image_id)))
    assert seen == sorted(inst.getImgIds())


def test_train_round_trip_with_flips(demo_coco_dir: Path, demo_shards_dir: Path) -> None:
    cfg = data_cfg(demo_shards_dir, "data.num_workers=0", "data.batch_size=4", "data.shuffle_buffer=8")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    inst = quiet_coco(demo_coco_dir / "annotations/instances_train.json")
    caps = quiet_coco(demo_coco_dir / "annotations/captions_train.json")
    flips = 0
    for batch in itertools.islice(build_train_loader(cfg, tok, rank=0, world_size=1, seed=1), 12):
        for i, meta in enumerate(batch.meta):
            info = inst.loadImgs(meta["image_id"])[0]
            h, w = batch.image_sizes[i]
            assert min(h, w) in (96, 128) or max(h, w) == 160
            boxes, labels = expected_targets(inst, meta["image_id"], (h, w))
            if meta["flipped"]:
                flips += 1
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            torch.testing.assert_close(batch.targets[i]["boxes"], boxes)
            assert torch.equal(batch.targets[i]["labels"], labels)
            assert meta["scale"] == pytest.approx(h / info["height"], rel=0.02)
            # The tokenised caption is one of the image's references.
            ids = batch.captions["input_ids"][i][batch.captions["attention_mask"][i].bool()]
            refs = [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=meta["image_id"]))]
            if meta["flipped"]:  # the mirrored image's caption has left and right swapped
                refs = [swap_left_right(r) for r in refs]
            assert len(ids) <= cfg.max_caption_tokens
            assert any(ref.startswith(tok.decode(ids[1:-1])) for ref in refs)  # possibly truncated
    assert 0 < flips < 48


def test_batch_format(demo_shards_dir: Path) -> None:
    cfg = data_cfg(demo_shards_dir, "data.num_workers=0", "data.batch_size=4", "data.max_caption_tokens=8")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    batch = next(iter(build_train_loader(cfg, tok, rank=0, world_size=1, seed=0)))
    images, sizes = batch.images, batch.image_sizes
    assert images.dtype == torch.uint8 and images.shape[:2] == (4, 3)  # normalised by the model
    assert images.shape[2:] == (max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, (h, w) in enumerate(sizes):
        assert isinstance(batch.image_sizes[i], tuple)
        assert images[i, :, h:, :].abs().sum() == 0 and images[i, :, :, w:].abs().sum() == 0  # zero padding
        assert images[i, :, h - 1, w - 1].abs().sum() > 0
        t = batch.targets[i]
        assert (
            t["boxes"].dtype == torch.float32
            and t["boxes"].shape[1] == 4
            and t["labels"].dtype == torch.int64
        )
        assert ((t["labels"] >= 1) & (t["labels"] <= 6)).all() and len(t["labels"]) == len(t["boxes"])
    ids, mask = batch.captions["input_ids"], batch.captions["attention_mask"]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[1] <= 8
    for row, m in zip(ids, mask, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # right padding
        assert row[0] == tok.bos_token_id and row[n - 1] == tok.eos_token_id
    assert batch.stats["read"] >= 4 and batch.stats["bad"] == {}
    meta = {"key", "image_id", "orig_size", "scale", "flipped", "captions", "source"}
    assert set(batch.meta[0]) == meta and batch.meta[0]["source"] == ""  # one unnamed source
    assert batch.has_boxes == batch.has_caption == [True] * 4  # the demo labels both everywhere


def test_k_captions_per_image_are_distinct_references_image_by_image(
    demo_coco_dir: Path, demo_shards_dir: Path
) -> None:
    cfg = data_cfg(demo_shards_dir, "data.num_workers=0", "data.batch_size=2", "data.captions_per_image=3")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    caps = quiet_coco(demo_coco_dir / "annotations/captions_train.json")
    for batch in itertools.islice(build_train_loader(cfg, tok, rank=0, world_size=1, seed=0), 3):
        ids, mask = batch.captions["input_ids"], batch.captions["attention_mask"]
        assert ids.shape[0] == 3 * len(batch.meta)
        for i, meta in enumerate(batch.meta):
            refs = [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=meta["image_id"]))]
            if meta["flipped"]:
                refs = [swap_left_right(r) for r in refs]
            texts = [tok.decode(ids[r][mask[r].bool()][1:-1]) for r in range(3 * i, 3 * i + 3)]
            # Three of the image's five references, drawn without replacement (possibly truncated).
            drawn = [next(j for j, ref in enumerate(refs) if ref.startswith(t)) for t in texts]
            assert len(set(drawn)) == 3
    # An image with fewer references than k repeats some; evaluation reads the first, once.
    train = SampleProcessor(cfg, [{"id": 1, "name": "a"}], train=True)
    assert sorted(set(train._draw_captions(["x", "y"], random.Random(0)))) == ["x", "y"]
    assert len(train._draw_captions(["x", "y"], random.Random(0))) == 3
    assert train._draw_captions([], random.Random(0)) == ["", "", ""]
    evaluator = SampleProcessor(cfg, [{"id": 1, "name": "a"}], train=False)
    assert evaluator._draw_captions(["x", "y"], random.Random(0)) == ["x"]
    eval_batch = next(iter(build_eval_loader(cfg, tok, rank=0, world_size=1)))
    assert eval_batch.captions["input_ids"].shape[0] == len(eval_batch.meta)


def test_batch_is_pinned_and_moved_whole(demo_shards_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's pinning (``pin_memory=True`` where CUDA is) reaches every tensor of a Batch through
    ``Batch.pin_memory`` (an object without that method is handed over unpinned), and ``Batch.to`` moves
    the same tensors, leaving the rest and the original as they were."""
    cfg = data_cfg(demo_shards_dir, "data.num_workers=0", "data.batch_size=4")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    batch = next(iter(build_train_loader(cfg, tok, rank=0, world_size=1, seed=0)))
    pinned: list[torch.Tensor] = []

    def pin(self: torch.Tensor, *args: object) -> torch.Tensor:  # no CUDA here: a copy stands for pinning
        pinned.append(self.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)

    def tensors(b: Batch) -> list[torch.Tensor]:
        return [b.images, *b.captions.values(), *(v for t in b.targets for v in t.values())]

    out = pin_memory(batch)  # what the DataLoader's pinning thread calls on each batch
    assert type(out) is Batch and len(tensors(out)) == len(pinned) == 3 + 2 * 4
    assert all(any(t is p for p in pinned) for t in tensors(out))
    assert all(torch.equal(a, b) for a, b in zip(tensors(out), tensors(batch), strict=True))
    assert (out.image_sizes, out.meta, out.stats, out.has_boxes) == (
        batch.image_sizes,
        batch.meta,
        batch.stats,
        batch.has_boxes,
    )
    moved = batch.to(torch.device("meta"))
    assert all(t.device.type == "meta" for t in tensors(moved))
    assert all(t.device.type == "cpu" for t in tensors(batch)) and moved.meta is batch.meta


@pytest.fixture(scope="module")
def many_shards(demo_coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo train split in 12 shards of 2 (enough to split shards over 2 ranks x 2 workers)."""
    out = tmp_path_factory.mktemp("many_shards")
    ann = demo_coco_dir / "annotations"
    records, cats = load_records(ann / "instances_train.json", ann / "captions_train.json")
    write_shards(records, cats, demo_coco_dir / "train", out, "train", samples_per_shard=2, progress=False)
    return out


@pytest.mark.parametrize("layout", ["shards_per_stream", "samples_modulo"])
def test_eval_two_ranks_two_workers_visit_each_sample_once(
    layout: str, many_shards: Path, demo_shards_dir: Path
) -> None:
    shards, split = (many_shards, "train") if layout == "shards_per_stream" else (demo_shards_dir, "val")
    cfg = data_cfg(shards, "data.num_workers=2", "data.eval_batch_size=2")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    per_rank, read = [], 0
    for rank in range(2):
        loader = build_eval_loader(cfg, tok, rank=rank, world_size=2, split=split)
        ids = []
        for batch in loader:
            ids += [m["image_id"] for m in batch.meta]
            read += batch.stats["read"]
        per_rank.append(ids)
    all_ids = per_rank[0] + per_rank[1]
    assert sorted(all_ids) == loader.image_ids and len(set(all_ids)) == len(all_ids)
    assert per_rank[0] and per_rank[1]
    assert read == len(all_ids)  # each sample read by its stream only, whatever the shard count


def test_eval_max_samples(many_shards: Path, demo_shards_dir: Path) -> None:
    cfg = data_cfg(many_shards, "data.num_workers=0", "data.eval_batch_size=4")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    got = []
    for rank in range(2):
        loader = build_eval_loader(cfg, tok, rank=rank, world_size=2, split="train", max_samples=5)
        got += [m["image_id"] for b in loader for m in b.meta]
    assert len(loader.image_ids) == 5 and sorted(got) == loader.image_ids


def test_train_stream_is_seeded_per_rank_and_resumable(demo_shards_dir: Path) -> None:
    cfg = data_cfg(demo_shards_dir, "data.num_workers=2", "data.batch_size=3", "data.shuffle_buffer=10")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")

    def take(n: int, **kw) -> list[dict]:
        return list(itertools.islice(build_train_loader(cfg, tok, world_size=2, **kw), n))

    full = take(7, rank=0, seed=5)
    assert batch_keys(full) == batch_keys(take(7, rank=0, seed=5))
    assert batch_keys(full) != batch_keys(take(7, rank=1, seed=5))
    assert batch_keys(full) != batch_keys(take(7, rank=0, seed=6))
    for start in (3, 4):  # resumed on either worker
        resumed = take(7 - start, rank=0, seed=5, start_batch=start)
        assert batch_keys(resumed) == batch_keys(full[start:])
        # Samples read since the previous batch: the replayed batches were counted before the interruption.
        assert [b.stats for b in resumed] == [b.stats for b in full[start:]]
        for a, b in zip(full[start:], resumed, strict=True):  # augmentations (size, flip, caption) too
            assert torch.equal(a.images, b.images)
            assert torch.equal(a.captions["input_ids"], b.captions["input_ids"])
            assert [m["flipped"] for m in a.meta] == [m["flipped"] for m in b.meta]


def test_aspect_buckets_and_grouping() -> None:
    from ticod.data.train_stream import aspect_bucket, group_by_aspect

    # Landscape 4:3, 3:2, 16:9; portrait likewise; square counts as landscape.
    assert [aspect_bucket(w, h) for w, h in ((640, 480), (640, 427), (640, 360), (100, 100))] == [0, 1, 2, 0]
    assert [aspect_bucket(w, h) for w, h in ((480, 640), (427, 640), (360, 640))] == [3, 4, 5]
    items = [(i, b) for i, b in enumerate([0, 3, 0, 3, 3, 1, 0, 1])]
    groups = list(group_by_aspect(items, 2, lambda item: item[1]))
    assert groups == [[(0, 0), (2, 0)], [(1, 3), (3, 3)], [(5, 1), (7, 1)]]  # (4, 3), (6, 0) still wait


def test_grouped_stream_one_bucket_one_scale_per_batch_and_resumable(demo_shards_dir: Path) -> None:
    """Grouped batches hold one aspect bucket and one drawn short side (so they are barely padded), and a
    resumed stream yields the uninterrupted stream's batches exactly, on either worker."""
    from ticod.data.train_stream import aspect_bucket

    cfg = data_cfg(
        demo_shards_dir, "data.num_workers=2", "data.batch_size=3", "data.shuffle_buffer=10",
        "data.group_by_aspect=true", "data.max_size=400",  # the demo images: short side decides the scale
    )  # fmt: skip
    tok = load_tokenizer(demo_shards_dir / "tokenizer")

    def take(n: int, start: int = 0) -> list[dict]:
        loader = build_train_loader(cfg, tok, rank=0, world_size=1, seed=3, start_batch=start)
        return list(itertools.islice(loader, n))

    full = take(8)
    for batch in full:
        orig = [m["orig_size"] for m in batch.meta]
        assert len({aspect_bucket(w, h) for h, w in orig}) == 1, orig
        assert len({min(s) for s in batch.image_sizes}) == 1, batch.image_sizes
    ungrouped = data_cfg(demo_shards_dir, "data.num_workers=2", "data.batch_size=3", "data.shuffle_buffer=10",
                         "data.group_by_aspect=false")  # fmt: skip
    plain = list(itertools.islice(build_train_loader(ungrouped, tok, rank=0, world_size=1, seed=3), 8))
    assert batch_keys(plain) != batch_keys(full)  # grouping reorders the same shuffled stream
    for start in (3, 4):
        resumed = take(8 - start, start)
        assert batch_keys(resumed) == batch_keys(full[start:])
        assert [b.stats for b in resumed] == [b.stats for b in full[start:]]
        for a, b in zip(full[start:], resumed, strict=True):
            assert torch.equal(a.images, b.images) and a.image_sizes == b.image_sizes
            assert torch.equal(a.captions["input_ids"], b.captions["input_ids"])


# ------------------------------------------------------------------ resume by seeking, eval shares (issue 14)
class CountingOpen:
    """``open`` for ticod.data.shards that counts the bytes read through it (what the loaders read)."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, *args, **kwargs):
        f = open(*args, **kwargs)  # noqa: SIM115 (handed to the caller, who closes it)
        read = f.read

        def counted(n=-1):
            data = read(n)
            self.bytes += len(data)
            return data

        f.read = counted
        return f


def format1_copy(shards: Path, split: str, out: Path) -> Path:
    """The split's shards with a manifest as written before format 2 (no byte offsets, json spans, sizes)."""
    out.mkdir()
    manifest = json.loads((shards / f"{split}-manifest.json").read_text())
    for s in manifest["shards"]:
        shutil.copy(shards / s["name"], out / s["name"])
        for key in ("offsets", "json", "sizes"):
            del s[key]
    manifest["format"] = 1
    (out / f"{split}-manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("grouped", [True, False])
def test_resume_seeks_reading_only_what_the_stream_holds(
    grouped: bool, demo_shards_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """A resumed stream yields the uninterrupted stream's batches; with byte offsets it reads about what a
    fresh start reads (the buffer, the waiting groups), not everything drawn before; a format-1 manifest
    replays (reading it all) with a warning, to the same batches."""
    group = f"data.group_by_aspect={str(grouped).lower()}"
    old = format1_copy(demo_shards_dir, "train", tmp_path / "old")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    opener = CountingOpen()
    monkeypatch.setattr(shards_module, "open", opener, raising=False)

    def take(shards: Path, n: int, start: int) -> tuple[list[dict], int]:
        cfg = data_cfg(shards, "data.num_workers=0", "data.batch_size=2", "data.shuffle_buffer=6", group)
        opener.bytes = 0
        batches = list(
            itertools.islice(build_train_loader(cfg, tok, rank=0, world_size=1, seed=3, start_batch=start), n)
        )
        return batches, opener.bytes

    full, _ = take(demo_shards_dir, 62, 0)
    _, fresh = take(demo_shards_dir, 2, 0)
    caplog.clear()
    seeked, seek_bytes = take(demo_shards_dir, 2, 60)
    assert "no per-sample byte offsets" not in caplog.text
    replayed, replay_bytes = take(old, 2, 60)
    assert "no per-sample byte offsets" in caplog.text and "re-reads every sample" in caplog.text
    for resumed in (seeked, replayed):
        assert batch_keys(resumed) == batch_keys(full[60:])
        assert [b.stats for b in resumed] == [b.stats for b in full[60:]]
        for a, b in zip(full[60:], resumed, strict=True):
            assert torch.equal(a.images, b.images)
    assert seek_bytes < 2 * fresh < replay_bytes / 5  # 120 samples drawn, 24 in all: many re-reads


@pytest.mark.parametrize("world", [1, 3, 8])
def test_eval_shares_score_every_image_once_and_read_each_byte_once(
    world: int, demo_coco_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Ranks simulated in one process: at any worker count every val image is in exactly one stream's
    share, the shares differ by at most one image, and together they read no more than the shards."""
    ann = demo_coco_dir / "annotations"
    records, cats = load_records(ann / "instances_val.json", ann / "captions_val.json")
    out = tmp_path / "val"
    write_shards(records, cats, demo_coco_dir / "val", out, "val", samples_per_shard=3, progress=False)
    shards, manifest = split_shards(str(out), "val")
    on_disk = sum((out / s["name"]).stat().st_size for s in manifest["shards"])
    opener = CountingOpen()
    monkeypatch.setattr(shards_module, "open", opener, raising=False)
    for workers in (0, 1, 2, 5):
        streams = world * max(1, workers)
        for limit in (0, 5):
            seen, sizes, opener.bytes = [], [], 0
            for rank in range(world):
                for worker in range(max(1, workers)):
                    me = rank * max(1, workers) + worker
                    share = eval_share(shards, me, streams, limit)
                    stats = StreamStats()
                    got = [json.loads(s["json"])["image_id"] for r in share for _, s in read_range(*r, stats)]
                    assert stats.read == len(got) and not stats.bad
                    seen += got
                    sizes.append(len(got))
            expected = sorted(r["image_id"] for r in records)[: limit or None]
            assert sorted(seen) == expected and len(seen) == len(set(seen)), (workers, limit)
            assert max(sizes) - min(sizes) <= 1
            assert opener.bytes <= on_disk


def test_shuffle_buffer_memory_is_logged(demo_shards_dir: Path, caplog) -> None:
    cfg = data_cfg(demo_shards_dir, "data.num_workers=2", "data.shuffle_buffer=100")
    manifest = json.loads((demo_shards_dir / "train-manifest.json").read_text())
    mean = sum(s["bytes"] for s in manifest["shards"]) / manifest["total_samples"]
    with caplog.at_level("INFO", logger="ticod.data.train_stream"):
        held = log_buffer_memory(cfg, manifest)
    assert held == int(200 * mean)
    assert "100 samples x 2 workers = 200 samples held per rank" in caplog.text
