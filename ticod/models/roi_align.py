"""Multi-level RoIAlign as the Swin Cascade reference runs it: ``aligned=True``, adaptive sampling.

torchvision's ``MultiScaleRoIAlign`` (level mapper and scales reused here) always pools with
``aligned=False``, which samples half a feature pixel up-left of the box (Detectron2 and mmcv's RoIAlign
default to ``aligned=True``; the shift matters most for the 0.7-IoU stage). Off the CPU each level runs
torchvision's ``roi_align(..., aligned=True)`` kernel.

On CPU, torchvision's ``roi_align`` backward recomputes the bilinear sampling weights for every channel and
took ~45% of a demo training step (torch profiler; tools/bench/roi_align.py compares the two). There this
module computes the same RoIAlign (torchvision's sampling points, border clamping, ``aligned=True`` and
adaptive or fixed sampling) as one ``embedding_bag`` over all FPN levels: every output bin is a weighted
sum of feature-map pixels, each a row of ``channels`` values, so the weights are computed once per bin and
the backward is a weighted scatter of whole rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign as _TorchvisionMultiScaleRoIAlign
from torchvision.ops import roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


class MultiScaleRoIAlign(_TorchvisionMultiScaleRoIAlign):
    """``torchvision.ops.MultiScaleRoIAlign`` with ``aligned=True``; ``sampling_ratio <= 0`` is adaptive."""

    def forward(
        self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(features) > 1 else rois.new_zeros(len(rois), dtype=torch.long)
        pool = self.kernel(features[0].device)
        return pool(features, rois, levels, self.scales, self.output_size, self.sampling_ratio)

    def kernel(self, device: torch.device) -> Callable[..., torch.Tensor]:
        """The pooling function for ``device``: the ``embedding_bag`` path on CPU, torchvision's kernel else."""
        return multi_level_roi_align if device.type == "cpu" else roi_align_per_level


def roi_align_per_level(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> torch.Tensor:
    """torchvision's ``_multiscale_roi_align`` with ``aligned=True``: one ``roi_align`` call per level.

    Arguments as :func:`multi_level_roi_align`; the result has the dtype of ``features[0]``.
    """
    out = features[0].new_zeros((len(rois), features[0].shape[1], *output_size))
    for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
        idx = torch.where(levels == level)[0]
        pooled = roi_align(feature, rois[idx], output_size, scale, sampling_ratio, aligned=True)
        # Levels may differ in dtype under autocast; the in-place copy does not cast by itself.
        out[idx] = pooled.to(out.dtype)
    return out


def multi_level_roi_align(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign (``aligned=True``) of each RoI on its level, as one ``embedding_bag``.

    Args:
        features: Per level (N, C, H_l, W_l).
        rois: (K, 5) rows of (image index, x1, y1, x2, y2) in input-image pixels; not differentiated.
        levels: (K,) index into ``features`` per RoI.
        scales: Per level feature size / image size.
        output_size: (pooled height, pooled width).
        sampling_ratio: Sampling points per bin along each axis; <= 0 for torchvision's adaptive
            ``ceil(roi size / pooled size)`` per RoI and axis.

    Returns:
        (K, C, ph, pw) in the dtype of ``features[0]`` (computed in at least float32, as torchvision's
        autocast does).
    """
    ph, pw = output_size
    device, channels, k = features[0].device, features[0].shape[1], len(rois)
    # One table of pixel rows (channels last) for all levels; a level's pixel (b, y, x) is row
    # start_l + (b * H_l + y) * W_l + x.
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features]).to(dtype)
    sizes = torch.tensor([f.shape[-2:] for f in features], device=device)
    starts = torch.tensor([0] + [f.numel() // channels for f in features[:-1]], device=device).cumsum(0)
    height, width = sizes[levels, 0], sizes[levels, 1]
    scale = torch.tensor(scales, dtype=dtype, device=device)[levels]
    # aligned=True: pixel centres sit at integer + 0.5, so box coordinates shift by half a pixel and
    # boxes keep their size (no minimum of one pixel).
    x1, y1, x2, y2 = (rois[:, 1:].detach().to(dtype) * scale[:, None] - 0.5).unbind(1)
    roi_h, roi_w = y2 - y1, x2 - x1
    if sampling_ratio > 0:
        grid_y = grid_x = torch.full((k,), sampling_ratio, dtype=torch.long, device=device)
    else:
        grid_y = torch.ceil(roi_h / ph).clamp(min=0).long()
        grid_x = torch.ceil(roi_w / pw).clamp(min=0).long()
    ys, y_weights = _axis_taps(y1, roi_h, height, ph, grid_y)
    xs, x_weights = _axis_taps(x1, roi_w, width, pw, grid_x)
    # Bag (r, i, j) holds the (2 * grid_y) x (2 * grid_x) neighbours of its sampling points (grids vary
    # per RoI when adaptive), laid out flat: tap t of the bag is y tap t // (2 * grid_x), x tap the rest.
    per_bag = (4 * grid_y * grid_x).repeat_interleave(ph * pw)
    offsets = per_bag.cumsum(0) - per_bag
    bag = torch.repeat_interleave(torch.arange(len(per_bag), device=device), per_bag)
    tap = torch.arange(len(bag), device=device) - offsets[bag]
    r, i, j = bag // (ph * pw), bag // pw % ph, bag % pw
    ty, tx = tap.div(2 * grid_x[r], rounding_mode="floor"), tap % (2 * grid_x[r])
    base = starts[levels] + rois[:, 0].long() * height * width
    index = base[r] + ys[r, i, ty] * width[r] + xs[r, j, tx]
    weight = y_weights[r, i, ty] * x_weights[r, j, tx] / (grid_y * grid_x).clamp(min=1)[r].to(dtype)
    # Kept for backward: int32 halves it where the table allows.
    index_dtype = torch.int32 if len(table) < 2**31 else torch.int64
    out = F.embedding_bag(
        index.to(index_dtype), table, offsets.to(index_dtype), mode="sum", per_sample_weights=weight
    )
    return out.view(k, ph, pw, channels).permute(0, 3, 1, 2).to(features[0].dtype)


def _axis_taps(
    start: torch.Tensor, length: torch.Tensor, size: torch.Tensor, pooled: int, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel indices and bilinear weights along one axis: (K, pooled, 2 * max(grid)) each.

    For bin ``i`` the sampling points are ``start + i * bin + (j + 0.5) * bin / grid`` with
    ``bin = length / pooled`` (torchvision's kernel); each contributes its lower and upper neighbour, and
    taps ``j >= grid`` of a RoI weigh 0. As torchvision: points outside [-1, size] weigh 0, points below 0
    are clamped to 0 and points at or past the last pixel take that pixel.
    """
    most = max(int(grid.max()), 1) if len(grid) else 1
    steps = torch.arange(max(pooled, most), dtype=start.dtype, device=start.device)
    bin_size = (length / pooled)[:, None, None]
    p = (
        start[:, None, None]
        + steps[:pooled, None] * bin_size
        + (steps[:most] + 0.5) * bin_size / grid.clamp(min=1)[:, None, None].to(start.dtype)
    )  # (K, pooled, most)
    inside = (p >= -1.0) & (p <= size[:, None, None]) & (steps[:most] < grid[:, None, None])
    p = p.clamp(min=0.0)
    low = p.floor().long()
    last = size[:, None, None] - 1
    at_end = low >= last
    low = torch.where(at_end, last, low)
    high = torch.where(at_end, last, low + 1)
    frac = torch.where(at_end, 0.0, p - low)
    index = torch.stack([low, high], -1).reshape(len(start), pooled, 2 * most)
    weight = (torch.stack([1.0 - frac, frac], -1) * inside[..., None]).reshape(len(start), pooled, 2 * most)
    return index, weight
