"""TICOD: one Swin backbone shared by a Cascade R-CNN detector and a GPT-2 caption decoder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from ticod.config import DataConfig, LossConfig, ModelConfig, Task
from ticod.models.backbone import SwinBackbone, pad_to_multiple
from ticod.models.captioner import (
    CROSS_ATTENTION_PARTS,
    CaptionDecoder,
    Objects,
    caption_rows,
    captions_per_image,
)
from ticod.models.detector import FPN_LEVELS, Detector
from ticod.models.losses import LossCombiner

# Side of the RGB thumbnail of each object's box that object tokens read (TICOD._objects).
THUMBNAIL = 3
# Which of the parts of an object's description (object_parts) is its class probabilities.
OBJECT_CLASS_PART = 1

log = logging.getLogger(__name__)


class TICOD(nn.Module):
    """The joint model: ``L = L_det + λ·L_cap`` in training; boxes and captions in eval.

    Only the branches of ``loss_cfg.task`` are built, so that every parameter receives a gradient at every
    step (ZeRO stages > 0 need that).

    Args:
        model_cfg: Backbone, FPN width, RPN, cascade head, captioner and number of classes.
        loss_cfg: Task switch (joint / detection / caption), λ and loss balancing.
        vocab_size: Tokenizer vocabulary size (``len(tokenizer)``).
        bos_token_id: First input token of every caption.
        eos_token_id: Caption end token.
        pad_token_id: Padding id of generated captions.
        tokenizer: Optional tokenizer; when given, eval outputs carry decoded caption strings.
        pixel_mean: Per-channel mean of pixels in [0, 1] that uint8 input batches are normalised with
            (``data.mean``); None: the config's default (ImageNet).
        pixel_std: Per-channel std likewise (``data.std``).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        vocab_size: int,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        tokenizer: Any = None,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        task = Task(loss_cfg.task)
        # Not in the state dict: they come from the config (checkpoints and exports stay as they were).
        defaults = DataConfig()
        for name, values in (
            ("pixel_mean", pixel_mean or defaults.mean),
            ("pixel_std", pixel_std or defaults.std),
        ):
            stats = torch.tensor(list(values), dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(name, stats, persistent=False)
        cap_cfg = model_cfg.captioner
        self.fpn_levels: list[str] = [str(n) for n in cap_cfg.fpn_levels] if cap_cfg.use_fpn_levels else []
        unknown = [n for n in self.fpn_levels if n not in FPN_LEVELS]
        if unknown:
            raise ValueError(f"model.captioner.fpn_levels: {unknown} not among the FPN levels {FPN_LEVELS}")
        if self.fpn_levels and task == Task.caption:
            # Without the detector some FPN layers would get no gradient (ZeRO hangs on that).
            raise ValueError("model.captioner.use_fpn_levels needs the detector (loss.task joint)")
        # Objects come from the detector: none without it (the caption-only arm of a joint config).
        self.object_tokens = cap_cfg.object_tokens if task == Task.joint else 0
        if cap_cfg.object_tokens and task == Task.caption:
            log.info(
                "model.captioner.object_tokens=%d: off for loss.task=caption (no detector)",
                cap_cfg.object_tokens,
            )
        self.object_min_score = cap_cfg.object_min_score
        self.object_nms_iou = cap_cfg.object_nms_iou

        # Caption-only reads the last stage only; its other stage norms would get no gradient.
        self.backbone = SwinBackbone(
            model_cfg.backbone, normed=(3,) if task == Task.caption else (0, 1, 2, 3)
        )
        self.detector: Detector | None = None
        self.captioner: CaptionDecoder | None = None
        if task != Task.caption:
            self.detector = Detector(
                self.backbone.channels,
                model_cfg.fpn_channels,
                model_cfg.rpn,
                model_cfg.roi,
                model_cfg.num_classes,
            )
        if task != Task.detection:
            visual = [self.backbone.channels[-1]] + [model_cfg.fpn_channels] * len(self.fpn_levels)
            self.captioner = CaptionDecoder(
                cap_cfg,
                visual,
                vocab_size,
                bos_token_id,
                eos_token_id,
                pad_token_id,
                object_parts=object_parts(model_cfg) if self.object_tokens else (),
            )
        self.loss_combiner = LossCombiner(
            loss_cfg, list(model_cfg.roi.stage_loss_weights), model_cfg.roi.box_loss_weight
        )
        self.tokenizer = tokenizer

    @property
    def object_class_weight(self) -> nn.Parameter | None:
        """The weight (decoder width, K + 1) that projects an object's class probabilities, one column per
        class (``model.init_from`` maps its columns to another label set); None without object tokens."""
        if self.captioner is None or self.captioner.objects is None:
            return None
        return self.captioner.objects.proj[OBJECT_CLASS_PART][0].weight

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch activation checkpointing in the backbone, the cascade stages and the caption decoder."""
        self.backbone.set_grad_checkpointing(enable)
        if self.detector is not None:
            self.detector.roi_heads.grad_checkpointing = enable
        if self.captioner is not None:
            self.captioner.set_grad_checkpointing(enable)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (tied GPT-2 embeddings counted once); the parts add up to the model total."""

        def count(module: nn.Module, keep: Callable[[str], bool] = lambda name: True) -> int:
            return sum(p.numel() for n, p in module.named_parameters() if keep(n))

        def is_cross(name: str) -> bool:
            return any(part in name for part in CROSS_ATTENTION_PARTS)

        counts = {"backbone": count(self.backbone)}
        if self.detector is not None:
            counts["fpn"] = count(self.detector.fpn)
            counts["rpn"] = count(self.detector.rpn)
            for i, stage in enumerate(self.detector.roi_heads.stages):
                counts[f"roi_stage{i}"] = count(stage)
        if self.captioner is not None:
            counts["gpt2"] = count(self.captioner.gpt, lambda n: not is_cross(n))
            counts["cross_attention"] = count(self.captioner.gpt, is_cross)
            counts["visual_memory"] = count(self.captioner.memory)
            if self.captioner.objects is not None:
                counts["object_memory"] = count(self.captioner.objects)
        if balance := count(self.loss_combiner):  # learned task weights (balance=uncertainty)
            counts["loss_balance"] = balance
        return counts

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
        captions: dict[str, torch.Tensor] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        orig_sizes: list[tuple[int, int]] | None = None,
        has_boxes: Sequence[bool] | None = None,
        has_caption: Sequence[bool] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, Any]]:
        """Losses in train mode, predictions in eval mode.

        Args:
            images: (B, 3, H, W) uint8 pixels, zero-padded (normalised here, see :meth:`normalize`), or a
                float batch already normalised with zero padding (any H, W: padded here for Swin).
            targets: Per image {"boxes": (N, 4) xyxy resized-image pixels, "labels": (N,) in 1..K}; needed to
                train the detector. N may be 0.
            captions: {"input_ids", "attention_mask"} (B·k, L), k captions per image, image by image
                (``data.captions_per_image``); needed to train the captioner.
            image_sizes: (h, w) of each image before padding; default: the full batch size.
            orig_sizes: (h, w) of the original images; eval boxes are rescaled to them when given.
            has_boxes: Per image whether it is labelled for boxes (None: all; a plain list, so selecting
                images costs no host-device sync). Detection losses come from these images alone, as if
                the detector ran on that sub-batch; the others' targets are ignored. Each detection loss is
                the mean over these images of each image's mean over its sampled anchors / RoIs.
            has_caption: Per image whether it has a caption (None: all); the caption loss is the mean over
                the captioned images' tokens alone. (:func:`label_units` counts both units: a trainer turns
                the means into sums and normalises them over a whole step, see ``term_det``/``term_cap``
                of :class:`ticod.models.losses.LossCombiner`.)

        Returns:
            Train: named unweighted losses (``rpn_objectness``, ``rpn_box``, ``stage{i}_cls``, ``stage{i}_box``,
            ``caption``) plus ``loss_det``, ``loss_cap``, the weighted total ``loss`` and each trained task's
            weighted part of it, ``term_det`` / ``term_cap``; a task with no
            labelled image in the batch has losses of exactly 0 (its branch still runs, see
            :meth:`_detection_losses`). Eval (``has_*`` unused): per image
            ``boxes`` (n, 4) xyxy, ``scores``, ``labels`` and/or ``caption_ids`` (and ``caption`` with a tokenizer).
        """
        sizes = self._image_sizes(images, image_sizes)
        padded = pad_to_multiple(self.normalize(images, sizes), self.backbone.size_divisor)
        features = self.backbone(padded)
        if self.training:
            return self._losses(padded, features, sizes, targets, captions, has_boxes, has_caption)
        return self._predict(padded, features, sizes, orig_sizes)

    def _losses(
        self,
        padded: torch.Tensor,
        features: dict[str, torch.Tensor],
        sizes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None,
        captions: dict[str, torch.Tensor] | None,
        has_boxes: Sequence[bool] | None,
        has_caption: Sequence[bool] | None,
    ) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        fpn = None
        if self.detector is not None:
            fpn, det_losses = self._detection_losses(padded, features, sizes, targets, has_boxes)
            losses.update(det_losses)
        if self.captioner is not None:
            if captions is None:
                raise ValueError("training the captioner needs captions")
            objects = None
            if self.object_tokens:  # the largest ground-truth boxes of the images labelled for boxes
                assert fpn is not None and targets is not None  # joint: the full batch's maps (see above)
                boxed = [True] * len(sizes) if has_boxes is None else list(has_boxes)
                boxes, labels = [], []
                for t, b in zip(targets, boxed, strict=True):
                    gt = t["boxes"].reshape(-1, 4).to(torch.float32)
                    keep = largest(gt, self.object_tokens) if b else gt.new_zeros(0, dtype=torch.int64)
                    boxes.append(gt[keep])
                    labels.append(t["labels"][keep])
                objects = self._objects(padded, fpn, boxes, sizes, labels)
            losses["caption"] = self.captioner(
                self._memory_maps(features, fpn),
                sizes,
                tuple(padded.shape[-2:]),
                captions["input_ids"],
                captions["attention_mask"],
                has_caption,
                objects=objects,
            )
        # A task without a labelled image in the batch: its loss is a zero stand-in (see above), and with
        # learned task weights its log-variance must not be pulled down by it either.
        return self.loss_combiner(losses, labelled_tasks(has_boxes, has_caption))

    def _detection_losses(
        self,
        padded: torch.Tensor,
        features: dict[str, torch.Tensor],
        sizes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None,
        has_boxes: Sequence[bool] | None,
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        """FPN maps of the whole batch (None where only some images are labelled and the captioner does
        not read them) and the detection losses of the images labelled for boxes, computed on that
        sub-batch alone: the other images give the RPN and cascade no gradient."""
        rows = labelled_rows(has_boxes, len(sizes), "has_boxes")
        if targets is None:
            raise ValueError("training the detector needs targets")
        targets = [
            {"boxes": t["boxes"].reshape(-1, 4).to(torch.float32), "labels": t["labels"].to(torch.int64)}
            | ({"classes": t["classes"].to(torch.bool)} if "classes" in t else {})
            for t in targets
        ]
        if rows is None:  # every image labelled: the plain batch
            fpn, _, losses = self.detector(padded, features, sizes, targets)
            return fpn, losses
        # No labelled image: image 0 with an empty target stands in and its losses are multiplied by 0.
        # The detector must still run and reach every weight: ZeRO 2/3 reduce each weight's gradient across
        # ranks in buckets (a rank with none hangs or desyncs the others), ZeRO-3 gathers weights at each
        # module forward, and SyncBN (roi.norm=syncbn) all-reduces statistics in forward, so every rank runs
        # the same detector forwards. (The stand-in's RoIs do enter the BatchNorm statistics.)
        stand_in = not rows
        if stand_in:
            rows = [0]
            targets = [
                {"boxes": padded.new_zeros((0, 4)), "labels": padded.new_zeros((0,), dtype=torch.int64)}
            ]
        else:
            targets = [targets[i] for i in rows]
        fpn = None
        if self.fpn_levels or self.object_tokens:  # the captioner reads the maps of every image
            fpn = self.detector.fpn(features)
            sub_fpn = {name: select_rows(x, rows) for name, x in fpn.items()}
        else:
            sub_fpn = self.detector.fpn({name: select_rows(x, rows) for name, x in features.items()})
        _, losses = self.detector.heads(select_rows(padded, rows), sub_fpn, [sizes[i] for i in rows], targets)
        if stand_in:
            losses = {name: loss * 0 for name, loss in losses.items()}
        return fpn, losses

    def _predict(
        self,
        padded: torch.Tensor,
        features: dict[str, torch.Tensor],
        sizes: list[tuple[int, int]],
        orig_sizes: list[tuple[int, int]] | None,
    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in sizes]
        fpn = None
        if self.detector is not None:
            fpn, detections, _ = self.detector(padded, features, sizes)
            for i, (res, det) in enumerate(zip(results, detections, strict=True)):
                boxes = det["boxes"]
                if orig_sizes is not None:
                    # torchvision's GeneralizedRCNNTransform.postprocess rescaling.
                    boxes = resize_boxes(boxes, sizes[i], [int(s) for s in orig_sizes[i]])
                res.update(boxes=boxes, scores=det["scores"], labels=det["labels"])
        if self.captioner is not None:
            objects = None
            if self.object_tokens:
                assert fpn is not None
                objects = self._objects(padded, fpn, self._confident_boxes(detections), sizes)
            ids = self.captioner.generate(
                self._memory_maps(features, fpn), sizes, tuple(padded.shape[-2:]), objects=objects
            )
            self._add_captions(results, ids)
        return results

    @torch.no_grad()
    def generate_captions(
        self,
        images: torch.Tensor,
        image_sizes: list[tuple[int, int]] | None = None,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
    ) -> list[torch.Tensor]:
        """Caption ids (without BOS/EOS) per image; beams and length default to the config's."""
        if self.captioner is None:
            raise RuntimeError("this model was built without the captioner (loss.task=detection)")
        maps, sizes, shape, objects = self.caption_memory(images, image_sizes)
        return self.captioner.generate(maps, sizes, shape, num_beams, max_new_tokens, objects=objects)

    def caption_memory(
        self, images: torch.Tensor, image_sizes: list[tuple[int, int]] | None = None
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]], tuple[int, int], Objects | None]:
        """What the caption decoder cross-attends to for ``images``: its feature maps, the images' (h, w),
        the padded batch's (h, w) and the detected objects (None without object tokens), as the decoder's
        forward and ``generate`` take them. With object tokens the model must be in eval mode (it detects)."""
        sizes = self._image_sizes(images, image_sizes)
        padded = pad_to_multiple(self.normalize(images, sizes), self.backbone.size_divisor)
        features = self.backbone(padded)
        fpn = self.detector.fpn(features) if self.fpn_levels or self.object_tokens else None
        objects = None
        if self.object_tokens:
            if self.training:
                raise RuntimeError("caption_memory with object tokens detects the objects: call model.eval()")
            assert self.detector is not None and fpn is not None
            detections, _ = self.detector.heads(padded, fpn, sizes)
            objects = self._objects(padded, fpn, self._confident_boxes(detections), sizes)
        shape = (int(padded.shape[-2]), int(padded.shape[-1]))
        return self._memory_maps(features, fpn), sizes, shape, objects

    def _confident_boxes(self, detections: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Per image the boxes of the detections scoring >= object_min_score, most confident first, without
        the less confident of two overlapping by IoU > object_nms_iou whatever their classes (the detector's
        NMS is per class, so one object scored as two classes would be read twice)."""
        out = []
        for d in detections:
            sure = d["scores"] >= self.object_min_score
            boxes, scores = d["boxes"][sure], d["scores"][sure]
            if self.object_nms_iou < 1:
                keep = box_ops.nms(boxes.float(), scores.float(), self.object_nms_iou)
            else:
                keep = scores.argsort(descending=True, stable=True)
            out.append(boxes[keep])
        return out

    @torch.no_grad()
    def _objects(
        self,
        padded: torch.Tensor,
        fpn: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        sizes: list[tuple[int, int]],
        labels: list[torch.Tensor] | None = None,
    ) -> Objects:
        """The first ``object_tokens`` boxes of each image, zero-padded to one (B, N) batch, each described by
        what the detector knows of it (:meth:`CascadeRoIHeads.describe` on its RoIAlign features: the last
        stage's box-head feature and the stage-averaged class probabilities) and by what it looks like: its
        box's normalised pixels averaged into a 3 x 3 RGB thumbnail (RoIAlign sampling about every pixel).
        The box head keeps what tells classes apart, not the colour that captions name.

        In training (``labels``: the classes of the ground-truth ``boxes``) the class part is the one-hot of
        the true class instead, as the boxes are the true ones: the decoder then learns what the class
        part says from the first step, whereas the detector's probabilities say little until the detector
        has learned (decoders that had to find it out later named the shapes badly in some seeds).

        Read without gradient: the caption loss trains neither the box heads nor the FPN through them. Every
        rank runs this even with no box, so ZeRO-3's weight gathers stay in step.
        """
        assert self.detector is not None
        heads = self.detector.roi_heads
        boxes = [b[: self.object_tokens].to(torch.float32) for b in boxes]
        feature, probs = heads.describe(heads.box_roi_pool(fpn, boxes, sizes), class_probs=labels is None)
        if labels is not None:  # the true classes: only the last box head ran, for its feature
            classes = torch.cat([c[: self.object_tokens] for c in labels]).to(feature.device)
            probs = F.one_hot(classes.long(), heads.num_classes + 1).to(feature.dtype)
        assert probs is not None
        pixels = roi_align(
            padded.float(), boxes, THUMBNAIL, spatial_scale=1.0, sampling_ratio=0, aligned=True
        )
        parts = torch.cat([feature, probs, pixels.flatten(1)], dim=-1)
        n = self.object_tokens
        out = Objects(
            parts.new_zeros((len(boxes), n, parts.shape[-1])),
            parts.new_zeros((len(boxes), n, 4)),
            torch.zeros((len(boxes), n), dtype=torch.int64, device=parts.device),
        )
        for i, part in enumerate(parts.split([len(b) for b in boxes])):
            out.features[i, : len(part)] = part
            out.boxes[i, : len(part)] = boxes[i]
            out.mask[i, : len(part)] = 1
        return out

    def normalize(self, images: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """:func:`normalize_pixels` with this model's ``pixel_mean``/``pixel_std`` (floats pass through)."""
        if images.is_floating_point():
            return images
        return normalize_pixels(images, sizes, self.pixel_mean, self.pixel_std)

    def _memory_maps(
        self, features: dict[str, torch.Tensor], fpn: dict[str, torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """The last backbone stage, then the configured FPN levels."""
        last = features[str(len(features) - 1)]
        if not self.fpn_levels:
            return [last]
        assert fpn is not None  # fpn_levels are only allowed with the detector (checked in __init__)
        return [last, *(fpn[n] for n in self.fpn_levels)]

    def _add_captions(self, results: list[dict[str, Any]], ids: list[torch.Tensor]) -> None:
        for res, seq in zip(results, ids, strict=True):
            res["caption_ids"] = seq
            if self.tokenizer is not None:
                res["caption"] = self.tokenizer.decode(seq.tolist(), skip_special_tokens=True).strip()

    @staticmethod
    def _image_sizes(
        images: torch.Tensor, image_sizes: list[tuple[int, int]] | None
    ) -> list[tuple[int, int]]:
        if image_sizes is None:
            return [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image_sizes for a batch of {images.shape[0]}")
        return [(int(h), int(w)) for h, w in image_sizes]


def object_parts(cfg: ModelConfig) -> tuple[int, int, int]:
    """Widths of the parts of an object's description (:meth:`TICOD._objects`): box-head feature, class
    probabilities (K + 1) and RGB thumbnail."""
    return cfg.roi.representation_size, cfg.num_classes + 1, 3 * THUMBNAIL * THUMBNAIL


def largest(boxes: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest of (N, 4) xyxy boxes by area, in their given order (all when N <= n)."""
    if len(boxes) <= n:
        return torch.arange(len(boxes), device=boxes.device)
    return box_ops.box_area(boxes).argsort(descending=True, stable=True)[:n].sort().values


def labelled_tasks(has_boxes: Sequence[bool] | None, has_caption: Sequence[bool] | None) -> tuple[bool, bool]:
    """Whether a batch has any image labelled for boxes / with a caption (None flags: every image is)."""
    return has_boxes is None or any(has_boxes), has_caption is None or any(has_caption)


def label_units(
    batch_size: int,
    attention_mask: torch.Tensor | None,
    has_boxes: Sequence[bool] | None = None,
    has_caption: Sequence[bool] | None = None,
) -> torch.Tensor:
    """(images labelled for boxes, caption target tokens) of a batch, float64 on the mask's device: the units
    that the detection losses (per image) and the caption loss (per token) are means over. A caption's
    targets are its tokens after BOS (padding excluded); uncaptioned rows have none. Tensor ops only (no
    host read), so a trainer can sum them over ranks without a sync of its own."""
    boxes = batch_size if has_boxes is None else sum(bool(f) for f in has_boxes)
    if attention_mask is None or attention_mask.numel() == 0:
        tokens = torch.zeros((), dtype=torch.float64)
    else:
        per_row = (attention_mask.to(torch.float64).sum(dim=1) - 1).clamp(min=0)
        k = captions_per_image(len(per_row), batch_size)
        rows = (
            range(len(per_row))
            if has_caption is None
            else caption_rows((i for i, f in enumerate(has_caption) if f), k)
        )
        tokens = sum((per_row[i] for i in rows), per_row.new_zeros(()))  # Python-int rows: no copy
    return torch.stack([tokens.new_full((), float(boxes)), tokens])


def labelled_rows(flags: Sequence[bool] | None, batch: int, name: str) -> list[int] | None:
    """Indices of the True ``flags``; None when every image is labelled (no flags, or all True)."""
    if flags is None:
        return None
    if len(flags) != batch:
        raise ValueError(f"{len(flags)} {name} flags for a batch of {batch}")
    rows = [i for i, flag in enumerate(flags) if flag]
    return None if len(rows) == batch else rows


def select_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]`` along dim 0 by Python-int slices (no index tensor to copy to the device); a view when
    the rows are consecutive."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0] : rows[0] + len(rows)]
    return torch.cat([x[i : i + 1] for i in rows])


def normalize_pixels(
    images: torch.Tensor, sizes: list[tuple[int, int]], mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """A zero-padded uint8 batch as float32 ``(pixels / 255 - mean) / std``, its padding 0.

    Run on the model's device, so the loader moves a quarter of float32's bytes. The padding beyond each
    image's ``sizes`` is set to 0 after normalising, as the float batches were padded (and as detectron2
    and mmdet pad after normalising). Slices by Python ints: no host-device sync.
    """
    x = images.float().div_(255).sub_(mean.float()).div_(std.float())
    height, width = x.shape[-2:]
    for i, (h, w) in enumerate(sizes):
        if h < height:
            x[i, :, h:] = 0
        if w < width:
            x[i, :, :h, w:] = 0
    return x
