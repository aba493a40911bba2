"""uint8 batches from the loader, normalised by the model on its device: the model sees what it saw when
the workers sent float32 batches normalised and zero-padded."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ticod.config import load_config
from ticod.data.tokenizer import load_tokenizer
from ticod.data.train_stream import build_train_loader
from ticod.factory import build_model
from ticod.models.backbone import pad_to_multiple

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not the defaults: they must come from the config


def float_batch_as_before(images: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """What the workers sent before: each image (pixels / 255 - mean) / std in float32, zero padding."""
    out = torch.zeros(images.shape, dtype=torch.float32)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for i, (h, w) in enumerate(sizes):
        x = images[i, :, :h, :w].float().div_(255)
        out[i, :, :h, :w] = (x - mean) / std
    return out


def test_model_sees_the_normalised_zero_padded_batch_of_before(demo_shards_dir: Path) -> None:
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"data.shards_dir={demo_shards_dir}",
            f"data.tokenizer={demo_shards_dir / 'tokenizer'}",
            "data.num_workers=0",
            "data.group_by_aspect=false",  # images of different sizes: padding inside the batch
            f"data.mean={MEAN}",
            f"data.std={STD}",
            "model.captioner.max_new_tokens=2",
        ],
    )
    tok = load_tokenizer(cfg.data.tokenizer)
    loader = build_train_loader(cfg.data, tok, rank=0, world_size=1, seed=0)
    batch = next(b for b in itertools.islice(loader, 20) if len(set(b.image_sizes)) > 1)
    images, sizes = batch.images, batch.image_sizes
    assert images.dtype == torch.uint8

    torch.manual_seed(0)
    model = build_model(cfg, tok)
    assert not any(k.startswith("pixel_") for k in model.state_dict())  # checkpoints unchanged
    seen: list[torch.Tensor] = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    expected = pad_to_multiple(float_batch_as_before(images, sizes), model.backbone.size_divisor)
    with torch.no_grad():
        model.train()(images, batch.targets, batch.captions, image_sizes=sizes)
        model.eval()(images, image_sizes=sizes)
        # A float batch is taken as normalised already: the old input gives the same backbone input.
        model.eval()(float_batch_as_before(images, sizes), image_sizes=sizes)
    assert len(seen) == 3
    for x in seen:
        assert x.dtype == torch.float32 and x.shape == expected.shape
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert (expected == 0).any() and (expected != 0).any()
