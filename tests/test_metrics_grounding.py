"""The caption grounding gap: 0 exactly for a decoder that cannot see the image, not 0 for one that can."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_model import batch, build

from ticod.metrics.grounding import grounding_gap


def test_gap_is_zero_for_a_blind_decoder_and_not_for_a_seeing_one():
    model = build()
    seeing = grounding_gap(model, [batch()])
    assert abs(seeing["grounding_gap"]) > 1e-4 and seeing["caption_loss"] > 0
    assert model.training  # the mode is restored
    # Blind: the cross-attention adds nothing to the residual stream (its output projections are 0).
    with torch.no_grad():
        for block in model.captioner.gpt.transformer.h:
            block.crossattention.c_proj.weight.zero_()
            block.crossattention.c_proj.bias.zero_()
    blind = grounding_gap(model, [batch()])
    assert blind["grounding_gap"] == pytest.approx(0.0, abs=1e-6)


def test_gap_needs_the_decoder_and_two_images():
    with pytest.raises(ValueError, match="caption decoder"):
        grounding_gap(build("loss.task=detection"), [batch()])
    one = batch()
    one = replace(one, images=one.images[:1], image_sizes=one.image_sizes[:1])
    with pytest.raises(ValueError, match="at least 2"):
        grounding_gap(build(), [one])


def test_gap_swaps_the_detected_objects_with_the_features():
    model = build("model.captioner.object_tokens=2", "model.captioner.object_min_score=0.0")
    # Blind to the feature maps: only the objects can make the gap.
    with torch.no_grad():
        model.captioner.memory.proj[0][0].weight.zero_()
        model.captioner.memory.proj[0][0].bias.zero_()
    assert abs(grounding_gap(model, [batch()])["grounding_gap"]) > 1e-4
