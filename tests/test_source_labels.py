"""Per-source label spaces (issue 25, defect 7): an image's classification loss, in each cascade stage, covers
its source's classes and background only; a source that annotates every class (one source: the demo)
trains exactly as before."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import DEMO, train_label_space

from ticod.config import load_config
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import build_train_loader
from ticod.factory import build_model, build_tokenizer

SIZES = ["data.train_min_sizes=[96,128]", "data.test_min_size=112", "data.max_size=160"]


def test_mix_targets_carry_the_classes_of_their_source(mix: dict) -> None:
    """Without the category map the mix has 8 classes: ``shapes`` annotates 6 of them, ``boxes`` 6 others
    (two renamed), ``caps`` none. Every target of a mixed batch carries its source's classes."""
    cfg = load_config(overrides=[mix["sources"], *SIZES, "data.num_workers=0"]).data
    names = [c["name"] for c in train_label_space(cfg).categories]
    assert len(names) == 8
    own = {
        "shapes": {"circle", "square", "triangle", "star", "hexagon", "cross"},
        "boxes": {"round", "box", "triangle", "star", "hexagon", "cross"},
        "caps": set(),
    }
    expected = {src: [True] + [n in classes for n in names] for src, classes in own.items()}
    loader = build_train_loader(cfg, load_tokenizer(mix["tok"]), rank=0, world_size=1, seed=0)
    seen = set()
    for batch, _ in zip(loader, range(20), strict=False):
        for meta, target in zip(batch.meta, batch.targets, strict=True):
            assert target["classes"].tolist() == expected[meta["source"]], meta["source"]
            assert all(expected[meta["source"]][label] for label in target["labels"].tolist())
            seen.add(meta["source"])
    assert seen == set(own)


def demo_model_and_batch(demo_shards_dir: Path):
    cfg = load_config(DEMO, [f"data.shards_dir={demo_shards_dir}", "data.num_workers=0"])
    tokenizer = build_tokenizer(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).train()
    batch = next(iter(build_train_loader(cfg.data, tokenizer, rank=0, world_size=1, seed=0)))
    assert all("classes" not in t for t in batch.targets)  # one source: no mask, as before
    return cfg, model, batch


def losses_and_grads(model, batch, targets) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the RoI sampler draws
    losses = model(
        batch.images,
        targets=targets,
        captions=batch.captions,
        image_sizes=batch.image_sizes,
        has_boxes=batch.has_boxes,
        has_caption=batch.has_caption,
    )
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_a_source_with_every_class_trains_bit_identically(demo_shards_dir: Path) -> None:
    """The demo batch with no class masks (the demo's path) and with masks of every class (the mix path)
    gives the same losses and gradients, bit for bit."""
    cfg, model, batch = demo_model_and_batch(demo_shards_dir)
    every = torch.ones(cfg.model.num_classes + 1, dtype=torch.bool)
    plain = losses_and_grads(model, batch, batch.targets)
    masked = losses_and_grads(model, batch, [t | {"classes": every} for t in batch.targets])
    assert plain[0].keys() == masked[0].keys() and "stage2_cls" in plain[0]
    for k in plain[0]:
        assert torch.equal(plain[0][k], masked[0][k]), k
    assert plain[1].keys() == masked[1].keys()
    for n in plain[1]:
        assert torch.equal(plain[1][n], masked[1][n]), n


def test_images_of_a_source_without_a_class_give_its_logits_no_gradient(demo_shards_dir: Path) -> None:
    """The demo batch as if from a source that does not annotate the last class X (its boxes dropped): with
    the source's mask X's classifier rows get no gradient in any stage; without it (X trained as background)
    they do."""
    cfg, model, batch = demo_model_and_batch(demo_shards_dir)
    x = cfg.model.num_classes
    without_x = [{k: v[t["labels"] != x] for k, v in t.items()} for t in batch.targets]
    mask = torch.ones(x + 1, dtype=torch.bool)
    mask[x] = False
    _, as_background = losses_and_grads(model, batch, without_x)
    losses, masked = losses_and_grads(model, batch, [t | {"classes": mask} for t in without_x])
    stages = [n[: -len(".cls_score.weight")] for n in masked if n.endswith(".cls_score.weight")]
    assert len(stages) == 3
    for stage in stages:
        for part in ("weight", "bias"):
            name = f"{stage}.cls_score.{part}"
            assert torch.count_nonzero(masked[name][x]) == 0, name
            assert torch.count_nonzero(masked[name][:x]) > 0, name  # the other classes still learn
            assert torch.count_nonzero(as_background[name][x]) > 0, name
    assert all(torch.isfinite(v) for v in losses.values())
