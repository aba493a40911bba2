"""Cascade R-CNN RoI head (Cai & Vasconcelos, 2018) assembled from torchvision's detection parts.

Each stage has its own box head (two FC layers, or four convs and one FC as the Swin Cascade reference),
classifier and box regressor, and its own IoU threshold and box-coder weights. In training, stage ``t`` matches its input boxes (plus the ground
truth) at its own IoU threshold, samples them, computes its losses and regresses the sampled
non-ground-truth boxes into the (detached) input boxes of stage ``t + 1``, as mmdetection's
``CascadeRoIHead`` does. At test time every stage runs on the boxes refined by the previous one; the
class scores are the mean of the stages' softmax probabilities (detectron2's and the paper's ensemble)
and the boxes come from the last stage's regression, followed by torchvision's per-class NMS and top-K.

Only the cascade logic is written here: matching, sampling, box coding, RoIAlign, NMS, the box heads and
the GIoU loss are torchvision's ``Matcher``, ``BalancedPositiveNegativeSampler``, ``BoxCoder``,
``MultiScaleRoIAlign`` (aligned, with a faster CPU path: :mod:`ticod.models.roi_align`), ``batched_nms``,
``TwoMLPHead`` / ``FastRCNNConvFCHead`` and ``generalized_box_iou_loss``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

from ticod.config import BoxLoss, RoIConfig, RoINorm
from ticod.models.losses import per_image_weights
from ticod.models.roi_align import MultiScaleRoIAlign

logger = logging.getLogger(__name__)


@dataclass
class Samples:
    """One stage's sampled RoIs for a batch, per image."""

    proposals: list[torch.Tensor]  # (n_i, 4) xyxy
    labels: list[torch.Tensor]  # (n_i,) 0 = background, 1..K
    matched_boxes: list[torch.Tensor]  # (n_i, 4) the GT box of each positive (negatives: the RoI itself)
    is_gt: list[torch.Tensor]  # (n_i,) bool: the RoI is an appended ground-truth box


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that normalises CPU batches per process.

    torch synchronises the batch statistics of accelerator tensors over the default process group when one
    is initialised with more than one process (NCCL on GPUs), and raises for CPU tensors (gloo). CPU
    batches (tests, the demo) take plain BatchNorm instead. Parameters and buffers are BatchNorm's either
    way, so a checkpoint moves between multi-GPU training and single-device or CPU inference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        if self.training:
            _log_per_process_batchnorm()
        return nn.BatchNorm2d.forward(self, x)  # type: ignore[arg-type]


@functools.cache
def _log_per_process_batchnorm() -> None:
    logger.info("model.roi.norm=syncbn on CPU: BatchNorm statistics are per process (synced on GPUs only)")


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups (mmdetection's GN), fewer if narrow


NORM_LAYERS: dict[RoINorm, Callable[[int], nn.Module] | None] = {
    RoINorm.syncbn: SyncBatchNorm,
    RoINorm.gn: _group_norm,
    RoINorm.none: None,
}


def box_head(cfg: RoIConfig, in_channels: int) -> nn.Module:
    """A stage's box head on (R, C, S, S) RoI features, ending in ReLU(FC) of ``representation_size``.

    ``shared2fc``: torchvision's ``TwoMLPHead``. ``4conv1fc``: torchvision's ``FastRCNNConvFCHead`` with
    four 3x3 convs of ``in_channels`` (each conv, norm, ReLU; bias only without a norm) and one FC, as
    mmdetection's ``Shared4Conv1FCBBoxHead`` (conv_out_channels 256 = the FPN width of the shipped configs).
    """
    size = cfg.roi_output_size
    if cfg.head == "shared2fc":
        return TwoMLPHead(in_channels * size**2, cfg.representation_size)
    return FastRCNNConvFCHead(
        (in_channels, size, size),
        [in_channels] * 4,
        [cfg.representation_size],
        norm_layer=NORM_LAYERS[RoINorm(cfg.norm)],
    )


class CascadeStage(nn.Module):
    """One cascade stage: box head, classifier, box regressor, the stage's target coding and box loss.

    Args:
        cfg: Head, norm, regression and box-loss settings (shared by the stages).
        in_channels: RoI feature channels (the FPN width).
        num_classes: Foreground classes K (the classifier has K + 1 outputs, 0 = background).
        iou_threshold: Foreground/background IoU threshold of this stage.
        bbox_stds: Target stds (x, y, w, h); the box coder weights are their reciprocals.
    """

    def __init__(
        self,
        cfg: RoIConfig,
        in_channels: int,
        num_classes: int,
        iou_threshold: float,
        bbox_stds: list[float],
    ) -> None:
        super().__init__()
        self.box_head = box_head(cfg, in_channels)
        self.cls_score = nn.Linear(cfg.representation_size, num_classes + 1)
        self.class_agnostic = cfg.class_agnostic_bbox
        self.bbox_pred = nn.Linear(
            cfg.representation_size, 4 if self.class_agnostic else 4 * (num_classes + 1)
        )
        # Small initial outputs (mmdetection/detectron2 init): near-uniform scores and near-identity
        # regression, so the first refinements do not throw boxes far off.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.box_coder = det_utils.BoxCoder(tuple(1.0 / s for s in bbox_stds))
        self.matcher = det_utils.Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.box_loss = BoxLoss(cfg.box_loss)
        self.smooth_l1_beta = float(cfg.smooth_l1_beta)

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (R, K + 1) and box deltas (R, 4) or (R, 4 * (K + 1)) of pooled RoIs, in fp32."""
        x = self.box_head(roi_features)
        # fp32 under bf16 autocast: torchvision's BoxCoder decodes in the deltas' dtype.
        return self.cls_score(x).float(), self.bbox_pred(x).float()

    def decode(self, deltas: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Boxes (R, C, 4) from deltas on their RoIs; C = 1 when class-agnostic, else K + 1."""
        return self.box_coder.decode(deltas, boxes)

    def match(
        self, proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Matched GT index (clamped to >= 0) and label (0 background, -1 ignored) for each proposal."""
        if gt_boxes.numel() == 0:
            # Background image: torchvision's Matcher raises on an empty IoU matrix.
            zeros = torch.zeros(proposals.shape[0], dtype=torch.int64, device=proposals.device)
            return zeros, zeros.clone()
        matched = self.matcher(box_ops.box_iou(gt_boxes, proposals))
        labels = gt_labels[matched.clamp(min=0)].to(torch.int64)
        labels[matched == self.matcher.BELOW_LOW_THRESHOLD] = 0
        labels[matched == self.matcher.BETWEEN_THRESHOLDS] = -1
        return matched.clamp(min=0), labels

    def losses(
        self,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        labels: torch.Tensor,
        proposals: torch.Tensor,
        matched_boxes: torch.Tensor,
        classes: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classification and box losses of the sampled RoIs (torchvision's ``fastrcnn_loss``), each RoI's
        weighted by ``weights`` (R,) and summed (None: 1 / R each, the mean over the RoIs).

        Cross-entropy over all sampled RoIs; with ``classes`` ((R, K + 1) bool: the classes each RoI's image
        is annotated for, background included) over those only (Detic's federated, UniDet's partitioned
        loss): the other classes' logits are left out of the softmax and get no gradient from that RoI. On the positives' deltas (of their GT class, or the single
        agnostic box): smooth-L1 against the encoded GT, or GIoU between the decoded box and the GT, weighted
        like the classification (the negatives' share counts, as torchvision divides by all sampled RoIs).
        With no positives the box loss is an exact 0 that still back-propagates (zero) gradients into the
        regressor.
        """
        if weights is None:
            weights = class_logits.new_full((len(labels),), 1.0 / max(len(labels), 1))
        if classes is not None:
            class_logits = class_logits.masked_fill(~classes, float("-inf"))
        cls_loss = (F.cross_entropy(class_logits, labels, reduction="none") * weights).sum()
        pos = torch.where(labels > 0)[0]
        deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)
        deltas = deltas[pos, torch.zeros_like(pos) if self.class_agnostic else labels[pos]]
        if self.box_loss == BoxLoss.giou:
            boxes = self.box_coder.decode_single(deltas, proposals[pos])
            box_loss = generalized_box_iou_loss(boxes, matched_boxes[pos], reduction="none")
        else:
            targets = self.box_coder.encode_single(matched_boxes[pos], proposals[pos])
            box_loss = F.smooth_l1_loss(deltas, targets, beta=self.smooth_l1_beta, reduction="none")
            box_loss = box_loss.sum(dim=1)
        return cls_loss, (box_loss * weights[pos]).sum()


def roi_classes(targets: list[dict[str, torch.Tensor]], labels: list[torch.Tensor]) -> torch.Tensor | None:
    """(R, K + 1) mask of the classes each sampled RoI's image is annotated for (``classes`` of its target,
    all where it has none), or None where no target has one (one source: every class)."""
    masks = [t.get("classes") for t in targets]
    if all(m is None for m in masks):
        return None
    every = torch.ones_like(next(m for m in masks if m is not None))
    return torch.cat(
        [(every if m is None else m).expand(len(lab), -1) for m, lab in zip(masks, labels, strict=True)]
    )


class CascadeRoIHeads(nn.Module):
    """Multi-stage Cascade R-CNN box head over FPN levels.

    Args:
        cfg: Per-stage IoU thresholds, box stds, head, box loss and sampling/inference settings (the stage
            and box loss weights are applied by :class:`ticod.models.losses.LossCombiner`, not here).
        in_channels: FPN channels.
        num_classes: Foreground classes K.
        featmap_names: FPN levels RoIAlign pools from (torchvision's level mapper picks one per box).
    """

    def __init__(self, cfg: RoIConfig, in_channels: int, num_classes: int, featmap_names: list[str]) -> None:
        super().__init__()
        if not len(cfg.iou_thresholds) == len(cfg.bbox_stds) >= 1:
            raise ValueError("model.roi: iou_thresholds and bbox_stds need one entry per stage")
        self.box_roi_pool = MultiScaleRoIAlign(featmap_names, cfg.roi_output_size, cfg.sampling_ratio)
        self.stages = nn.ModuleList(
            CascadeStage(cfg, in_channels, num_classes, iou, stds)
            for iou, stds in zip(cfg.iou_thresholds, cfg.bbox_stds, strict=True)
        )
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(
            cfg.batch_size_per_image, cfg.positive_fraction
        )
        self.num_classes = num_classes
        self.grad_checkpointing = cfg.grad_checkpointing
        self.score_thresh = cfg.score_thresh
        self.nms_thresh = cfg.nms_thresh
        self.detections_per_img = cfg.detections_per_img

    # ------------------------------------------------------------------------------ training
    def sample(
        self, stage: CascadeStage, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> Samples:
        """Append the GT boxes, match at the stage's IoU and sample (torchvision's select_training_samples)."""
        gts = [t["boxes"].to(p.dtype) for t, p in zip(targets, proposals, strict=True)]
        candidates = [torch.cat([p, gt]) for p, gt in zip(proposals, gts, strict=True)]
        matches = [stage.match(c, gt, t["labels"]) for c, gt, t in zip(candidates, gts, targets, strict=True)]
        pos_masks, neg_masks = self.fg_bg_sampler([labels for _, labels in matches])
        out = Samples([], [], [], [])
        for i, (cand, (matched, labels), gt) in enumerate(zip(candidates, matches, gts, strict=True)):
            keep = torch.where(pos_masks[i] | neg_masks[i])[0]
            props, matched, labels = cand[keep], matched[keep], labels[keep]
            # Every RoI of a box-less image "matches" itself (torchvision's dummy is a [0,0,0,0] box); the
            # loss reads the matched boxes of positives only.
            out.proposals.append(props)
            out.labels.append(labels)
            out.matched_boxes.append(gt[matched] if gt.numel() else props)
            out.is_gt.append(keep >= len(proposals[i]))
        return out

    def refine(
        self,
        stage: CascadeStage,
        deltas: torch.Tensor,
        class_logits: torch.Tensor,
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        labels: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Next stage's input boxes: this stage's regression applied to its RoIs, clipped, detached.

        With class-specific regression the box of the GT label is used for positives in training, and of
        the highest-scoring foreground class otherwise (mmdetection's ``regress_by_class``).
        """
        with torch.no_grad():
            boxes = stage.decode(deltas.detach(), proposals)
            if not stage.class_agnostic:
                cls = class_logits.detach()[:, 1:].argmax(dim=1) + 1
                if labels is not None:
                    given = torch.cat(labels)
                    cls = torch.where(given > 0, given, cls)
                boxes = boxes[torch.arange(len(boxes), device=boxes.device), cls]
            boxes = boxes.reshape(-1, 4).split([len(p) for p in proposals])
            return [box_ops.clip_boxes_to_image(b, size) for b, size in zip(boxes, image_sizes, strict=True)]

    # ------------------------------------------------------------------------------- forward
    def _pool_and_classify(
        self,
        stage: CascadeStage,
        features: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return stage(self.box_roi_pool(features, boxes, image_sizes))

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Run the cascade.

        Args:
            features: FPN maps by name.
            proposals: RPN boxes per image (xyxy, detached).
            image_sizes: (h, w) of each image before batch padding.
            targets: Per image {"boxes": (N, 4) xyxy, "labels": (N,) in 1..K, optionally "classes": (K + 1,)
                bool, the classes its source annotates (:meth:`CascadeStage.losses`)}; required in training.

        Returns:
            Detections per image (eval; empty list in training) and unweighted losses
            ``stage{i}_cls``/``stage{i}_box`` (training; empty dict in eval).
        """
        if not self.training:
            return self.predict(features, proposals, image_sizes), {}
        if targets is None:
            raise ValueError("CascadeRoIHeads needs targets in training mode")
        losses: dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.stages):
            samples = self.sample(stage, proposals, targets)
            if self.grad_checkpointing:
                logits, deltas = checkpoint(
                    self._pool_and_classify,
                    stage,
                    features,
                    samples.proposals,
                    image_sizes,
                    use_reentrant=False,
                )
            else:
                logits, deltas = self._pool_and_classify(stage, features, samples.proposals, image_sizes)
            labels = torch.cat(samples.labels)
            losses[f"stage{i}_cls"], losses[f"stage{i}_box"] = stage.losses(
                logits,
                deltas,
                labels,
                torch.cat(samples.proposals),
                torch.cat(samples.matched_boxes),
                roi_classes(targets, samples.labels),
                per_image_weights(samples.labels).to(logits.device),
            )
            if i + 1 < len(self.stages):
                refined = self.refine(stage, deltas, logits, samples.proposals, image_sizes, samples.labels)
                # The refined GT boxes are dropped: the next stage appends the GT again (mmdetection).
                proposals = [b[~g] for b, g in zip(refined, samples.is_gt, strict=True)]
        return [], losses

    @torch.no_grad()
    def predict(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Stage-averaged scores, last-stage boxes, then score threshold, per-class NMS and top-K."""
        probs: list[torch.Tensor] = []
        boxes = proposals
        for i, stage in enumerate(self.stages):
            logits, deltas = stage(self.box_roi_pool(features, boxes, image_sizes))
            probs.append(F.softmax(logits, dim=-1))
            if i + 1 < len(self.stages):
                boxes = self.refine(stage, deltas, logits, boxes, image_sizes)
        scores = torch.stack(probs).mean(dim=0)
        pred = self.stages[-1].decode(deltas, boxes)  # the last stage's regression on its input boxes
        if pred.shape[1] == 1:
            pred = pred.expand(-1, self.num_classes + 1, -1)
        counts = [len(b) for b in boxes]
        return [
            self.postprocess(b, s, size)
            for b, s, size in zip(pred.split(counts), scores.split(counts), image_sizes, strict=True)
        ]

    @torch.no_grad()
    def describe(
        self, roi_features: torch.Tensor, class_probs: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the detector knows of given boxes' pooled features: the last stage's box-head feature
        (R, representation_size), which its classifier reads linearly, and the stage-averaged class
        probabilities (R, K + 1), as :meth:`predict` scores (None with ``class_probs=False``: then only the
        last box head runs). Every box head runs in eval mode here (its norms neither update running
        statistics nor sync across ranks)."""
        stages = self.stages if class_probs else self.stages[-1:]
        modes = [stage.box_head.training for stage in stages]
        probs = []
        try:
            for stage in stages:
                stage.box_head.eval()
                x = stage.box_head(roi_features)
                if class_probs:
                    probs.append(F.softmax(stage.cls_score(x).float(), dim=-1))
        finally:
            for stage, mode in zip(stages, modes, strict=True):
                stage.box_head.train(mode)
        return x.float(), torch.stack(probs).mean(dim=0) if class_probs else None

    def postprocess(
        self, boxes: torch.Tensor, scores: torch.Tensor, image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """torchvision's ``postprocess_detections`` for one image: (R, K + 1, 4) boxes, (R, K + 1) scores."""
        boxes = box_ops.clip_boxes_to_image(boxes, image_size)
        labels = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
        # Drop the background column and treat every (RoI, class) pair as a candidate.
        boxes, scores, labels = (
            boxes[:, 1:].reshape(-1, 4),
            scores[:, 1:].reshape(-1),
            labels[:, 1:].reshape(-1),
        )
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
