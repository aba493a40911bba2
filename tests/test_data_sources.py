"""A mix of shard sets (data.sources): draw shares, one label space merged by name, partial labels in the
batch, per-source counts, and an exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import train_label_space

from ticod.config import load_config
from ticod.data.plan import StreamPlan
from ticod.data.samples import Batch
from ticod.data.sources import (
    LabelSpace,
    SourceError,
    shard_weights,
    source_category_ids,
)
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import build_train_loader

SIZES = ["data.train_min_sizes=[96,128]", "data.test_min_size=112", "data.max_size=160"]


def test_shard_weights_give_each_source_its_share_and_its_samples_equal_chances() -> None:
    sizes, weights = [[100, 100, 50], [10, 7], [100, 100]], [3.0, 1.0, 0.5]
    p = shard_weights(sizes, weights)
    n = np.concatenate([np.asarray(s, dtype=np.float64) for s in sizes])
    per_draw = p * n  # expected samples per draw from each shard
    shares = [per_draw[:3].sum(), per_draw[3:5].sum(), per_draw[5:].sum()]
    np.testing.assert_allclose(np.array(shares) / sum(shares), np.array(weights) / sum(weights), rtol=1e-12)
    # A drawn shard is read whole, so a sample comes as often as its shard is drawn: equal within a source.
    assert p[0] == p[1] == p[2] and p[3] == p[4] and p[5] == p[6]

    # The stream plan draws shards with these weights: 50,000 draws give the shares to within 1%.
    plan = StreamPlan("mix", n.astype(int).tolist(), 4, p)
    draws = np.array([plan.shard(j) for j in range(50_000)])
    got = np.bincount(draws, minlength=len(n)) * n
    by_source = np.array([got[:3].sum(), got[3:5].sum(), got[5:].sum()]) / got.sum()
    np.testing.assert_allclose(by_source, np.array(weights) / sum(weights), atol=0.01)


def test_label_space_merges_by_name_renames_with_the_map_and_names_unknowns() -> None:
    coco = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    other = [{"id": 1, "name": "Person"}, {"id": 2, "name": "automobile"}, {"id": 5, "name": "kite"}]
    space = LabelSpace([("coco", coco), ("o365", other), ("web", [])], {"o365": {"Person": "person"}})
    # The first source keeps its ids; names new in a later source get ids above them, in source order.
    assert [(c["id"], c["name"]) for c in space.categories] == [
        (1, "person"),
        (3, "car"),
        (18, "dog"),
        (19, "automobile"),
        (20, "kite"),
    ]
    assert space.to_merged == {"coco": {1: 1, 3: 3, 18: 18}, "o365": {1: 1, 2: 19, 5: 20}, "web": {}}
    # Evaluating o365 scores labels in its own ids, by name from the merged categories.
    assert source_category_ids(space.categories, other, {"Person": "person"}) == [1, None, None, 2, 5]
    with pytest.raises(SourceError, match="'Kite' of the source is not among the model's categories"):
        source_category_ids(space.categories, [{"id": 9, "name": "Kite"}], {})
    assert "2 from o365: 'automobile', 'kite'" in space.describe()

    mapped = LabelSpace(
        [("coco", coco), ("o365", other)], {"o365": {"Person": "person", "automobile": "car"}}
    )
    assert mapped.to_merged["o365"] == {1: 1, 2: 3, 5: 19} and len(mapped.categories) == 4
    with pytest.raises(SourceError, match="source 'o365' has no category named 'Kite'"):
        LabelSpace([("coco", coco), ("o365", other)], {"o365": {"Kite": "kite"}})
    with pytest.raises(SourceError, match="no source named 'objects365'"):
        LabelSpace([("coco", coco), ("o365", other)], {"objects365": {"kite": "kite"}})


def test_mix_batches_carry_labels_per_source_merged_categories_and_counts(mix: dict) -> None:
    over = [mix["sources"], f"data.category_map={mix['map']}", *SIZES, "data.num_workers=0"]
    cfg = load_config(overrides=over).data
    space = train_label_space(cfg)
    assert [c["name"] for c in space.categories] == [
        "circle",
        "square",
        "triangle",
        "star",
        "hexagon",
        "cross",
    ]
    loader = build_train_loader(cfg, load_tokenizer(mix["tok"]), rank=0, world_size=1, seed=0)
    # The streams draw shards with the sources' weights: shapes 8+8+8 at 2, boxes 4 x 6 at 1, caps 3+3+2 at 1.
    expected = shard_weights([[8, 8, 8], [6, 6, 6, 6], [3, 3, 2]], [2, 1, 1])
    np.testing.assert_allclose(loader.dataset.weights, expected, rtol=1e-12)
    seen: dict[str, int] = {}
    counted: dict[str, int] = {}
    labels: dict[tuple[str, int], list[int]] = {}
    for batch, _ in zip(loader, range(40), strict=False):
        for name, n in batch.stats.get("sources", {}).items():
            counted[name] = counted.get(name, 0) + n
        for i, meta in enumerate(batch.meta):
            src = meta["source"]
            seen[src] = seen.get(src, 0) + 1
            expected = {"shapes": (True, True), "boxes": (True, False), "caps": (False, True)}[src]
            assert (batch.has_boxes[i], batch.has_caption[i]) == expected, src
            if src == "caps":
                assert len(batch.targets[i]["boxes"]) == 0
            if not meta["flipped"]:
                labels[src, meta["image_id"]] = sorted(batch.targets[i]["labels"].tolist())
    assert set(seen) == {"shapes", "boxes", "caps"} and counted == seen
    # The same image through the renamed source gets the same labels (the map put them back).
    same = [(k[1]) for k in labels if k[0] == "boxes" and ("shapes", k[1]) in labels]
    assert same, "no image seen through both sources; draw more batches"
    for image_id in same:
        assert labels["boxes", image_id] == labels["shapes", image_id]

    # Without the map the renamed categories are new ones: the training's num_classes check names them.
    plain = train_label_space(load_config(overrides=[mix["sources"]]).data)
    assert len(plain.categories) == 8 and "2 from boxes: 'round', 'box'" in plain.describe()


def test_mix_stream_is_deterministic_and_resumes_exactly(mix: dict) -> None:
    over = [mix["sources"], f"data.category_map={mix['map']}", *SIZES, "data.num_workers=0"]
    cfg = load_config(overrides=[*over, "data.shuffle_buffer=5"]).data
    tok = load_tokenizer(mix["tok"])

    def keys(start: int, n: int) -> list[tuple[str, int, bool]]:
        loader = build_train_loader(cfg, tok, rank=0, world_size=1, seed=3, start_batch=start)
        return [
            (m["source"], m["image_id"], m["flipped"])
            for batch, _ in zip(loader, range(n), strict=False)
            for m in batch.meta
        ]

    whole = keys(0, 30)
    assert whole == keys(0, 30)
    assert keys(21, 9) == whole[21 * 2 :]
    assert len({s for s, _, _ in whole}) == 3


def test_one_source_draws_every_shard_equally_often_the_short_last_one_too() -> None:
    # A drawn shard is read whole: drawing by size would give the last shard's samples 3/10 the chance.
    plan = StreamPlan("one", [10, 10, 3, 0], 4)
    np.testing.assert_allclose(plan.p, [1 / 3, 1 / 3, 1 / 3, 0])


def test_logged_task_losses_are_means_over_the_micro_batches_that_had_the_task() -> None:
    from ticod.train import tasks_present
    from ticod.train_metrics import Window

    window = Window()
    parts = {"caption": 2.0, "loss_cap": 2.0, "rpn_box": 4.0, "loss_det": 4.0, "loss": 4.4}
    window.add_losses({k: torch.tensor(v) for k, v in parts.items()}, 2, (True, True))
    # A captions-only micro-batch: its detection losses are the model's exact-zero stand-in.
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    only_caps = Batch(images, [(8, 8)] * 2, has_boxes=[False, False], has_caption=[True, True])
    zeros = {**parts, "caption": 1.0, "loss_cap": 1.0, "rpn_box": 0.0, "loss_det": 0.0, "loss": 0.2}
    window.add_losses({k: torch.tensor(v) for k, v in zeros.items()}, 2, tasks_present(only_caps))
    out = window.reduce(torch.device("cpu"), 1)
    assert out["loss_det"] == out["rpn_box"] == 4.0  # not 2.0: the stand-in is no detection loss
    assert out["caption"] == out["loss_cap"] == 1.5 and out["loss"] == pytest.approx(2.3)
    assert tasks_present(Batch(images, [(8, 8)] * 2)) == (True, True)  # no flags: every image has both
