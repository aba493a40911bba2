"""Detection branch: torchvision FPN + RPN over the backbone maps, then the Cascade R-CNN head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ticod.config import RoIConfig, RPNConfig
from ticod.models.cascade import CascadeRoIHeads
from ticod.models.losses import per_image_weights

# FPN outputs: one per backbone stage plus the max-pooled extra level (P6, used by the RPN only, as in
# torchvision's and mmdetection's Faster/Cascade R-CNN).
FPN_LEVELS = ("0", "1", "2", "3", "pool")
ROI_LEVELS = ["0", "1", "2", "3"]


class FloatRPNHead(RPNHead):
    """torchvision's RPN head with fp32 outputs.

    Under bf16 autocast the 1x1 convs return bf16, and torchvision's ``BoxCoder.decode`` then casts the
    anchors to bf16 too (about 4 px of rounding at 1333 px); fp32 outputs keep proposals exact.
    """

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class FloatAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator, always in fp32.

    torchvision builds anchors in the dtype of the feature maps, which are bf16 under autocast: with 8
    mantissa bits, x > 1024 px is rounded to a multiple of 8, so anchors shift by up to 4 px and P2
    neighbours (stride 4) collapse onto one another. The maps are only read for their shapes and device,
    so fp32 stand-ins of the same shapes (expanded scalars, no memory) are passed instead.
    """

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]
        with torch.autocast(feature_maps[0].device.type, enabled=False):
            return super().forward(image_list, shapes)


class PerImageRPN(RegionProposalNetwork):
    """torchvision's RPN whose losses are per-image means of the sampled anchors' losses, averaged over the
    images (:func:`per_image_weights`; torchvision's mean over all sampled anchors weighs an image by how
    many anchors it sampled)."""

    def compute_loss(
        self,
        objectness: torch.Tensor,
        pred_bbox_deltas: torch.Tensor,
        labels: list[torch.Tensor],
        regression_targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        sampled = [torch.where(p | n)[0] for p, n in zip(pos_masks, neg_masks, strict=True)]
        weights = per_image_weights(sampled).to(objectness.device)
        offsets = [0]
        for lab in labels[:-1]:
            offsets.append(offsets[-1] + len(lab))
        inds = torch.cat([s + o for s, o in zip(sampled, offsets, strict=True)])
        labels_all, targets_all = torch.cat(labels), torch.cat(regression_targets)
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[inds], labels_all[inds], weight=weights, reduction="sum"
        )
        # Positives only: a box-less image's targets encode all-zero boxes (infinite log-sizes).
        pos = labels_all[inds] > 0
        box = F.smooth_l1_loss(
            pred_bbox_deltas[inds[pos]], targets_all[inds[pos]], beta=1 / 9, reduction="none"
        ).sum(dim=1)
        return objectness_loss, (box * weights[pos]).sum()


class Detector(nn.Module):
    """FPN -> RPN -> Cascade R-CNN.

    Args:
        in_channels: Channels of the four backbone maps.
        fpn_channels: FPN output channels.
        rpn_cfg: Anchors (one size per FPN level, 5 levels) and proposal settings.
        roi_cfg: Cascade head settings.
        num_classes: Foreground classes K.
    """

    def __init__(
        self,
        in_channels: list[int],
        fpn_channels: int,
        rpn_cfg: RPNConfig,
        roi_cfg: RoIConfig,
        num_classes: int,
    ) -> None:
        super().__init__()
        if len(rpn_cfg.anchor_sizes) != len(FPN_LEVELS):
            raise ValueError(
                f"model.rpn.anchor_sizes needs one size per FPN level ({len(FPN_LEVELS)}), "
                f"got {list(rpn_cfg.anchor_sizes)}"
            )
        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        anchors = FloatAnchorGenerator(
            sizes=tuple((int(s),) for s in rpn_cfg.anchor_sizes),
            aspect_ratios=(tuple(float(r) for r in rpn_cfg.aspect_ratios),) * len(FPN_LEVELS),
        )
        self.rpn = PerImageRPN(
            anchors,
            FloatRPNHead(fpn_channels, len(rpn_cfg.aspect_ratios)),
            fg_iou_thresh=rpn_cfg.fg_iou_thresh,
            bg_iou_thresh=rpn_cfg.bg_iou_thresh,
            batch_size_per_image=rpn_cfg.batch_size_per_image,
            positive_fraction=rpn_cfg.positive_fraction,
            pre_nms_top_n={"training": rpn_cfg.pre_nms_top_n_train, "testing": rpn_cfg.pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_cfg.post_nms_top_n_train, "testing": rpn_cfg.post_nms_top_n_test},
            nms_thresh=rpn_cfg.nms_thresh,
        )
        self.roi_heads = CascadeRoIHeads(roi_cfg, fpn_channels, num_classes, ROI_LEVELS)

    def forward(
        self,
        images: torch.Tensor,
        backbone_features: dict[str, torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Run the detector.

        Args:
            images: The padded (B, 3, H, W) batch the maps came from (anchor strides derive from its size).
            backbone_features: The four backbone maps ("0".."3").
            image_sizes: (h, w) of each image before padding (proposals and boxes are clipped to it).
            targets: Per image {"boxes", "labels"}; required in training.

        Returns:
            FPN maps (the captioner may read them), detections (eval; empty in training) and unweighted
            losses ``rpn_objectness``, ``rpn_box``, ``stage{i}_cls``, ``stage{i}_box`` (training).
        """
        fpn = self.fpn(backbone_features)
        detections, losses = self.heads(images, fpn, image_sizes, targets)
        return fpn, detections, losses

    def heads(
        self,
        images: torch.Tensor,
        fpn: dict[str, torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """RPN and cascade on FPN maps: detections (eval) and losses (training) as :meth:`forward`.

        ``images`` is the padded batch of these maps (same batch size and H, W): the anchors' strides and
        count per image derive from it.
        """
        proposals, rpn_losses = self.rpn(ImageList(images, list(image_sizes)), fpn, targets)
        detections, roi_losses = self.roi_heads(fpn, proposals, image_sizes, targets)
        losses = {}
        if rpn_losses:
            losses = {
                "rpn_objectness": rpn_losses["loss_objectness"],
                "rpn_box": rpn_losses["loss_rpn_box_reg"],
            }
        return detections, {**losses, **roi_losses}
