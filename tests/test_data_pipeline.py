"""ticod.data.pipeline: round trip against pycocotools, batch format, rank/worker splitting, resume."""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from ticod.config import DataConfig, load_config
from ticod.data.coco import CategoryMap, load_records
from ticod.data.pipeline import build_eval_loader, build_train_loader
from ticod.data.shards import write_shards
from ticod.data.tokenizer import load_tokenizer
from ticod.data.transforms import resize_size, swap_left_right

SIZES = ["data.train_min_sizes=[96,128]", "data.test_min_size=112", "data.max_size=160"]


def data_cfg(shards: Path, *overrides: str) -> DataConfig:
    return load_config(overrides=[f"data.shards_dir={shards}", *SIZES, *overrides]).data


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
        for i, meta in enumerate(batch["meta"]):
            image_id = meta["image_id"]
            seen.append(image_id)
            info = inst.loadImgs(image_id)[0]
            assert meta["orig_size"] == (info["height"], info["width"]) and not meta["flipped"]
            size = resize_size(info["height"], info["width"], 112, 160)
            assert tuple(batch["image_sizes"][i]) == size
            boxes, labels = expected_targets(inst, image_id, size)
            torch.testing.assert_close(batch["targets"][i]["boxes"], boxes)
            assert torch.equal(batch["targets"][i]["labels"], labels)
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
        for i, meta in enumerate(batch["meta"]):
            info = inst.loadImgs(meta["image_id"])[0]
            h, w = batch["image_sizes"][i]
            assert min(h, w) in (96, 128) or max(h, w) == 160
            boxes, labels = expected_targets(inst, meta["image_id"], (h, w))
            if meta["flipped"]:
                flips += 1
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            torch.testing.assert_close(batch["targets"][i]["boxes"], boxes)
            assert torch.equal(batch["targets"][i]["labels"], labels)
            assert meta["scale"] == pytest.approx(h / info["height"], rel=0.02)
            # The tokenised caption is one of the image's references.
            ids = batch["captions"]["input_ids"][i][batch["captions"]["attention_mask"][i].bool()]
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
    images, sizes = batch["images"], batch["image_sizes"]
    assert images.dtype == torch.float32 and images.shape[:2] == (4, 3)
    assert images.shape[2:] == (max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, (h, w) in enumerate(sizes):
        assert isinstance(batch["image_sizes"][i], tuple)
        assert images[i, :, h:, :].abs().sum() == 0 and images[i, :, :, w:].abs().sum() == 0  # zero padding
        assert images[i, :, h - 1, w - 1].abs().sum() > 0
        t = batch["targets"][i]
        assert (
            t["boxes"].dtype == torch.float32
            and t["boxes"].shape[1] == 4
            and t["labels"].dtype == torch.int64
        )
        assert ((t["labels"] >= 1) & (t["labels"] <= 6)).all() and len(t["labels"]) == len(t["boxes"])
    ids, mask = batch["captions"]["input_ids"], batch["captions"]["attention_mask"]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[1] <= 8
    for row, m in zip(ids, mask, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # right padding
        assert row[0] == tok.bos_token_id and row[n - 1] == tok.eos_token_id
    assert batch["stats"]["read"] >= 4 and batch["stats"]["bad"] == {}
    assert set(batch["meta"][0]) == {"key", "image_id", "orig_size", "scale", "flipped", "captions"}


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
            ids += [m["image_id"] for m in batch["meta"]]
            read += batch["stats"]["read"]
        per_rank.append(ids)
    all_ids = per_rank[0] + per_rank[1]
    assert sorted(all_ids) == loader.image_ids and len(set(all_ids)) == len(all_ids)
    assert per_rank[0] and per_rank[1]
    expected_read = (
        len(all_ids) if layout == "shards_per_stream" else 4 * len(all_ids)
    )  # modulo: all read all
    assert read == expected_read


def test_eval_max_samples(many_shards: Path, demo_shards_dir: Path) -> None:
    cfg = data_cfg(many_shards, "data.num_workers=0", "data.eval_batch_size=4")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")
    got = []
    for rank in range(2):
        loader = build_eval_loader(cfg, tok, rank=rank, world_size=2, split="train", max_samples=5)
        got += [m["image_id"] for b in loader for m in b["meta"]]
    assert len(loader.image_ids) == 5 and sorted(got) == loader.image_ids


def keys(batches) -> list[list[str]]:
    return [[m["key"] for m in b["meta"]] for b in batches]


def test_train_stream_is_seeded_per_rank_and_resumable(demo_shards_dir: Path) -> None:
    cfg = data_cfg(demo_shards_dir, "data.num_workers=2", "data.batch_size=3", "data.shuffle_buffer=10")
    tok = load_tokenizer(demo_shards_dir / "tokenizer")

    def take(n: int, **kw) -> list[dict]:
        return list(itertools.islice(build_train_loader(cfg, tok, world_size=2, **kw), n))

    full = take(7, rank=0, seed=5)
    assert keys(full) == keys(take(7, rank=0, seed=5))
    assert keys(full) != keys(take(7, rank=1, seed=5))
    assert keys(full) != keys(take(7, rank=0, seed=6))
    for start in (3, 4):  # resumed on either worker
        resumed = take(7 - start, rank=0, seed=5, start_batch=start)
        assert keys(resumed) == keys(full[start:])
        # Samples read since the previous batch: the replayed batches were counted before the interruption.
        assert [b["stats"] for b in resumed] == [b["stats"] for b in full[start:]]
        for a, b in zip(full[start:], resumed, strict=True):  # augmentations (size, flip, caption) too
            assert torch.equal(a["images"], b["images"])
            assert torch.equal(a["captions"]["input_ids"], b["captions"]["input_ids"])
            assert [m["flipped"] for m in a["meta"]] == [m["flipped"] for m in b["meta"]]
