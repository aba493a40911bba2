"""Multi-level RoIAlign (aligned=True, fixed or adaptive sampling) equals torchvision's kernel, values and gradients."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision

from ticod.models.roi_align import MultiScaleRoIAlign, roi_align_per_level

NAMES = ["0", "1", "2", "3"]


def pyramid(image: tuple[int, int], batch: int, channels: int, dtype: torch.dtype) -> OrderedDict:
    """FPN-like maps at strides 4..32 (plus an unused "pool" level) with gradients."""
    h, w = image
    g = torch.Generator().manual_seed(0)
    maps = OrderedDict(
        (name, torch.randn(batch, channels, -(-h // s), -(-w // s), generator=g, dtype=dtype))
        for name, s in zip([*NAMES, "pool"], (4, 8, 16, 32, 64), strict=True)
    )
    for m in maps.values():
        m.requires_grad_(True)
    return maps


def boxes_for(image: tuple[int, int], n: int, seed: int) -> torch.Tensor:
    """Random boxes of all sizes, some tiny, some crossing or outside the image border, one on the corner."""
    h, w = image
    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 1.3 - 0.15) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) ** 2 * torch.tensor([w, h]) * 1.1 + 0.1
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([w - 3.0, h - 3.0, w + 5.0, h + 5.0])
    return boxes


def run(pool, maps, boxes, sizes):
    out = pool(maps, boxes, sizes)
    weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), [maps[n] for n in NAMES])
    return out, grads


def reference(pool, maps, boxes, sizes):
    """RoI by RoI: torchvision's ``roi_align(aligned=True)`` on the level torchvision's mapper picks."""
    pool(maps, boxes, sizes)  # sets up the scales and the level mapper
    levels = pool.map_levels(boxes)
    rois = torchvision.ops._utils.convert_boxes_to_roi_format(boxes)
    out = [
        torchvision.ops.roi_align(
            maps[pool.featmap_names[lvl]],
            roi[None],
            pool.output_size,
            pool.scales[lvl],
            pool.sampling_ratio,
            aligned=True,
        )
        for roi, lvl in zip(rois, levels.tolist(), strict=True)
    ]
    return torch.cat(out)


@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("output_size", [7, (5, 3)])
def test_matches_torchvision_aligned(sampling_ratio, output_size):
    """CPU path and per-level (GPU) path both equal torchvision's aligned kernel, values and gradients."""
    image, sizes = (512, 704), [(512, 704), (400, 520)]
    maps = pyramid(image, 2, 5, torch.float64)
    # Adaptive sampling: grids from 1 to dozens of points per bin, and 0 for the zero-width box.
    boxes = [
        boxes_for(image, 40, 1),
        torch.cat([boxes_for(sizes[1], 25, 2), torch.tensor([[9.0, 5, 9, 60]])]),
    ]
    pool = MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    ours, ours_grads = run(pool, maps, boxes, sizes)
    ref, ref_grads = run(lambda *a: reference(pool, *a), maps, boxes, sizes)
    features = [maps[n] for n in NAMES]
    levels = pool.map_levels(boxes)
    rois = torchvision.ops._utils.convert_boxes_to_roi_format(boxes)
    per_level, per_level_grads = run(
        lambda *_: roi_align_per_level(features, rois, levels, pool.scales, pool.output_size, sampling_ratio),
        maps,
        boxes,
        sizes,
    )
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    for out, grads in ((ours, ours_grads), (per_level, per_level_grads)):
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert all(g.abs().sum() > 0 for g in ref_grads)  # every level received RoIs
    # aligned=True differs from torchvision's MultiScaleRoIAlign (aligned=False) by the half-pixel shift.
    unaligned = torchvision.ops.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)(maps, boxes, sizes)
    assert (unaligned - ref).abs().max() > 1e-2


def test_single_level_empty_and_float32():
    image = (64, 96)
    maps = pyramid(image, 2, 3, torch.float32)
    boxes = [torch.zeros(0, 4), torch.tensor([[4.0, 4.0, 40.0, 30.0], [0.0, 0.0, 96.0, 64.0]])]
    for names in (["1"], NAMES):
        pool = MultiScaleRoIAlign(names, 7, 0)
        ours = pool(maps, boxes, [image, image])
        ref = reference(pool, maps, boxes, [image, image])
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    empty = MultiScaleRoIAlign(NAMES, 7, 2)(maps, [torch.zeros(0, 4), torch.zeros(0, 4)], [image, image])
    assert empty.shape == (0, 3, 7, 7)


def test_bfloat16_features_pool_in_float32():
    image = (64, 96)
    maps = OrderedDict((k, v.detach().bfloat16()) for k, v in pyramid(image, 1, 4, torch.float32).items())
    boxes = [torch.tensor([[3.3, 5.1, 50.7, 33.2], [10.0, 10.0, 90.0, 60.0]])]
    pool = MultiScaleRoIAlign(NAMES, 7, 0)
    ours = pool(maps, boxes, [image])
    ref = reference(pool, OrderedDict((k, v.float()) for k, v in maps.items()), boxes, [image])
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, rtol=1e-2, atol=1e-2)
