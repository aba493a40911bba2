"""Caption grounding: how much the caption decoder's loss depends on seeing the right image.

A decoder that writes the same sentence for every image (issue 24's collapse) has learned the captions'
language but not the image: its teacher-forced loss barely changes when each caption is scored against
another image's features. The gap (loss against another image of the batch minus loss against its own)
is that dependence in nats per token: about 0 for a blind decoder, 0.15-0.2 for the demo model trained as
the quickstart does. Unlike the number of distinct captions, it moves smoothly from the first hundred steps,
so a short training can be checked with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ticod.models.ticod import TICOD

if TYPE_CHECKING:
    from ticod.data.samples import Batch


@torch.no_grad()
def grounding_gap(model: TICOD, batches: Iterable[Batch]) -> dict[str, float]:
    """Mean teacher-forced caption loss of ``batches`` (training batches of >= 2 images) with each image's
    own features ("caption_loss") and with its neighbour's in the batch ("grounding_gap": rolled minus own).
    """
    if model.captioner is None:
        raise ValueError("grounding_gap needs the caption decoder (loss.task joint or caption)")
    was_training = model.training
    model.eval()  # no dropout; the caption loss itself does not depend on the mode
    own, gaps = [], []
    try:
        for batch in batches:
            images = batch.images
            if images.shape[0] < 2:
                raise ValueError("grounding_gap needs batches of at least 2 images")
            maps, sizes, shape, objects = model.caption_memory(images, batch.image_sizes)
            ids, mask = batch.captions["input_ids"], batch.captions["attention_mask"]
            loss = model.captioner(maps, sizes, shape, ids, mask, label_smoothing=0.0, objects=objects)
            other = [*range(1, len(sizes)), 0]
            swapped = model.captioner(
                [m[other] for m in maps],
                [sizes[i] for i in other],
                shape,
                ids,
                mask,
                label_smoothing=0.0,
                objects=None if objects is None else objects.rows(other),
            )
            own.append(float(loss))
            gaps.append(float(swapped - loss))
    finally:
        model.train(was_training)
    if not own:
        raise ValueError("grounding_gap got no batches")
    return {"caption_loss": sum(own) / len(own), "grounding_gap": sum(gaps) / len(gaps)}


def grounding_of_run(
    path: str | Path, shards_dir: str | Path, split: str = "val", batches: int = 12
) -> dict[str, float]:
    """:func:`grounding_gap` of a trained model (export, run or checkpoint dir) on ``batches`` batches of
    ``split`` drawn by the training pipeline (seed 0: the same images for every model of one data config)."""
    from ticod.data.train_stream import build_train_loader
    from ticod.export import load_for_inference

    bundle = load_for_inference(path, overrides=[f"data.shards_dir={shards_dir}", "data.num_workers=0"])
    bundle.cfg.data.train_split = split
    loader = iter(build_train_loader(bundle.cfg.data, bundle.tokenizer, rank=0, world_size=1, seed=0))
    return grounding_gap(bundle.model, [next(loader) for _ in range(batches)])
