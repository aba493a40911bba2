"""torchvision's ``MultiScaleRoIAlign`` with a faster CPU path for training.

torchvision's CPU ``roi_align`` backward recomputes the bilinear sampling weights for every channel and
took ~45% of a demo training step on CPU (torch profiler; tools/bench/roi_align.py compares the two). On CPU this module computes the same
RoIAlign (torchvision's sampling points, border clamping and ``aligned=False``, as ``MultiScaleRoIAlign``
uses) as one ``embedding_bag`` over all FPN levels: every output bin is a weighted sum of
``4 * sampling_ratio**2`` feature-map pixels, each a row of ``channels`` values, so the weights are computed
once per bin and the backward is a weighted scatter of whole rows. Level assignment and scales are
torchvision's. GPUs, and adaptive sampling (``sampling_ratio <= 0``), use torchvision's kernels unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign as _TorchvisionMultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


class MultiScaleRoIAlign(_TorchvisionMultiScaleRoIAlign):
    """Drop-in ``torchvision.ops.MultiScaleRoIAlign``; CPU inputs take :func:`multi_level_roi_align`."""

    def forward(
        self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        features = _filter_input(x, self.featmap_names)
        if features[0].device.type != "cpu" or self.sampling_ratio <= 0:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(features) > 1 else rois.new_zeros(len(rois), dtype=torch.long)
        return multi_level_roi_align(
            features, rois, levels, self.scales, self.output_size, self.sampling_ratio
        )


def multi_level_roi_align(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign (``aligned=False``) of each RoI on its level, as one ``embedding_bag``.

    Args:
        features: Per level (N, C, H_l, W_l).
        rois: (K, 5) rows of (image index, x1, y1, x2, y2) in input-image pixels; not differentiated.
        levels: (K,) index into ``features`` per RoI.
        scales: Per level feature size / image size.
        output_size: (pooled height, pooled width).
        sampling_ratio: Sampling points per bin along each axis (> 0).

    Returns:
        (K, C, ph, pw) in the dtype of ``features[0]`` (computed in at least float32, as torchvision's
        autocast does).
    """
    ph, pw = output_size
    device, channels = features[0].device, features[0].shape[1]
    # One table of pixel rows (channels last) for all levels; a level's pixel (b, y, x) is row
    # start_l + (b * H_l + y) * W_l + x.
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features]).to(dtype)
    sizes = torch.tensor([f.shape[-2:] for f in features], device=device)
    starts = torch.tensor([0] + [f.numel() // channels for f in features[:-1]], device=device).cumsum(0)
    height, width = sizes[levels, 0], sizes[levels, 1]
    scale = torch.tensor(scales, dtype=dtype, device=device)[levels]
    x1, y1, x2, y2 = (rois[:, 1:].detach().to(dtype) * scale[:, None]).unbind(1)
    ys, y_weights = _axis_taps(y1, (y2 - y1).clamp(min=1.0), height, ph, sampling_ratio)
    xs, x_weights = _axis_taps(x1, (x2 - x1).clamp(min=1.0), width, pw, sampling_ratio)
    base = starts[levels] + rois[:, 0].long() * height * width
    k = len(rois)
    # (K, ph, pw, taps_y, taps_x): every sampling point's four neighbours, weighted and averaged.
    index = (base.view(k, 1, 1, 1, 1) + ys[:, :, None, :, None] * width.view(k, 1, 1, 1, 1)) + xs[
        :, None, :, None, :
    ]
    weight = (y_weights[:, :, None, :, None] * x_weights[:, None, :, None, :] / sampling_ratio**2).to(dtype)
    taps = index.shape[-1] * index.shape[-2]
    # Kept for backward: int32 halves it where the table allows.
    index = index.reshape(-1, taps).to(torch.int32 if len(table) < 2**31 else torch.int64)
    out = F.embedding_bag(index, table, per_sample_weights=weight.reshape(-1, taps), mode="sum")
    return out.view(k, ph, pw, channels).permute(0, 3, 1, 2).to(features[0].dtype)


def _axis_taps(
    start: torch.Tensor, length: torch.Tensor, size: torch.Tensor, pooled: int, sampling_ratio: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel indices and bilinear weights along one axis: (K, pooled, 2 * sampling_ratio) each.

    For bin ``i`` the sampling points are ``start + (i + (j + 0.5) / s) * length / pooled``; each
    contributes its lower and upper neighbour. As torchvision: points outside [-1, size] weigh 0, points
    below 0 are clamped to 0 and points at or past the last pixel take that pixel.
    """
    s = sampling_ratio
    steps = torch.arange(max(pooled, s), dtype=start.dtype, device=start.device)
    offsets = steps[:pooled, None] + (steps[:s] + 0.5) / s
    p = start[:, None] + offsets.reshape(1, -1) * (length / pooled)[:, None]  # (K, pooled * s)
    inside = (p >= -1.0) & (p <= size[:, None])
    p = p.clamp(min=0.0)
    low = p.floor().long()
    last = size[:, None] - 1
    at_end = low >= last
    low = torch.where(at_end, last, low)
    high = torch.where(at_end, last, low + 1)
    frac = torch.where(at_end, 0.0, p - low)
    index = torch.stack([low, high], -1).reshape(len(start), pooled, 2 * s)
    weight = (torch.stack([1.0 - frac, frac], -1) * inside[..., None]).reshape(len(start), pooled, 2 * s)
    return index, weight
