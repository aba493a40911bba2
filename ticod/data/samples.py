"""Raw shard samples -> processed samples -> collated batches, and the counts of what was skipped.

:class:`SampleProcessor` turns one raw sample (its ``.jpg`` and ``.json`` members) into a transformed
image, targets, a caption and meta; :func:`process_all` runs it over a group; :func:`collate` pads and
packs a group into a batch. The streams (:mod:`ticod.data.train_stream`, :mod:`ticod.data.eval_stream`)
collate inside their dataloader worker, which is what lets every batch carry ``stats`` (samples read and
skipped by reason in that worker since its previous batch, a :class:`StreamStats`), so the main process
can count bad samples across worker processes; it also moves padding off the training process. Images
travel as uint8 pixels (a quarter of float32's bytes); the model normalises them on its device
(``TICOD.normalize``).

Bad data never stops a job: unreadable or truncated shards, malformed members, undecodable JPEGs and
unusable annotations skip the sample and count it by reason in ``stats["bad"]``. Boxes that are dropped
while the sample is kept (zero-size, or outside the image) are counted in ``stats["fixed"]``. Only the
``.jpg`` and ``.json`` members are ever read (no automatic decoding of other extensions, no pickle),
and nothing is extracted to disk.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ticod.config import DataConfig
from ticod.data.coco import CategoryMap
from ticod.data.records import record_tasks
from ticod.data.tokenizer import encode_captions
from ticod.data.transforms import (
    SizeMismatchError,
    clip_boxes,
    decode_rgb,
    hflip,
    keep_nondegenerate,
    resize,
    swap_left_right,
    to_uint8_tensor,
    xywh_to_xyxy,
)

log = logging.getLogger(__name__)


# Reasons a sample is skipped (stats["bad"]): a whole shard unreadable (each of its manifest samples counts
# once), samples a damaged or truncated shard did not give, a damaged tar header (that sample only;
# manifests with byte offsets), ...
MISSING_JSON = "missing_json"
BAD_JSON = "bad_json"
MISSING_JPEG = "missing_jpeg"
BAD_JPEG = "bad_jpeg"
SIZE_MISMATCH = "size_mismatch"
BAD_ANNOTATION = "bad_annotation"
# ... and boxes dropped from samples that are kept (stats["fixed"]).
DEGENERATE_BOX = "degenerate_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"


class BadSample(Exception):
    """A sample that cannot be used; ``args[0]`` is the reason it is counted under."""


class StreamStats:
    """Counters of one worker's stream, handed out with each batch and reset."""

    def __init__(self) -> None:
        self.read = 0
        self.bad: Counter[str] = Counter()
        self.fixed: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()  # samples processed per named source (a mix)

    def pop(self) -> dict[str, Any]:
        out = {"read": self.read, "bad": dict(self.bad), "fixed": dict(self.fixed)}
        if self.sources:
            out["sources"] = dict(self.sources)
        self.__init__()
        return out

    def pending(self) -> bool:
        return bool(self.read or self.bad or self.fixed or self.sources)


class SampleProcessor:
    """Raw shard sample -> transformed image, targets, caption text, labelled tasks and meta (raises
    :class:`BadSample`).

    ``categories``: the label space (labels 1..K). ``sources``: per source of the mix, its name and the map
    of its category ids onto the label space's (None: the ids are the label space's).
    """

    def __init__(
        self,
        cfg: DataConfig,
        categories: Sequence[dict[str, Any]],
        *,
        train: bool,
        sources: Sequence[tuple[str, dict[int, int] | None]] = (("", None),),
    ) -> None:
        self.cmap = CategoryMap(categories)
        self.sources = list(sources)
        # Per source: the labels it annotates as a (K + 1,) mask with background, None where it annotates
        # every class (one source; then the target carries no mask and the losses are as without sources).
        self.classes = [self._classes(remap) for _, remap in self.sources]
        self.train = train
        self.min_sizes = [int(s) for s in cfg.train_min_sizes] if train else [int(cfg.test_min_size)]
        self.max_size = int(cfg.max_size)
        self.hflip_prob = float(cfg.hflip_prob) if train else 0.0  # eval never flips
        self.captions_per_image = int(cfg.captions_per_image) if train else 1

    def _draw_captions(self, captions: list[str], rng: random.Random) -> list[str]:
        """The caption texts a sample trains on: k of its references, without replacement where it has k."""
        k = self.captions_per_image
        if not captions:
            return [""] * k
        if not self.train:
            return [captions[0]]
        if k == 1:
            return [rng.choice(captions)]
        drawn = rng.sample(captions, min(k, len(captions)))
        return drawn + [rng.choice(captions) for _ in range(k - len(drawn))]

    def _classes(self, remap: dict[int, int] | None) -> torch.Tensor | None:
        if remap is None:
            return None
        labels = {self.cmap.to_label(c) for c in remap.values()}
        if len(labels) == len(self.cmap):
            return None
        mask = torch.zeros(len(self.cmap) + 1, dtype=torch.bool)
        mask[[0, *sorted(labels)]] = True
        return mask

    def _meta(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "json" not in sample:
            raise BadSample(MISSING_JSON)
        try:
            meta = json.loads(sample["json"])
            n = len(meta["boxes"])
            if not all(len(meta[k]) == n for k in ("category_ids", "iscrowd")):
                raise ValueError("annotation lists differ in length")
            for k in ("image_id", "width", "height"):
                int(meta[k])
            if not all(isinstance(c, str) for c in meta["captions"]):
                raise ValueError("captions must be strings")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise BadSample(BAD_JSON) from e
        return meta

    def _targets(
        self,
        meta: dict[str, Any],
        width: int,
        height: int,
        stats: StreamStats,
        remap: dict[int, int] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        try:
            boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
            ids = meta["category_ids"] if remap is None else [remap[int(c)] for c in meta["category_ids"]]
            labels = torch.tensor([self.cmap.to_label(c) for c in ids], dtype=torch.int64)
            crowd = torch.tensor([bool(c) for c in meta["iscrowd"]], dtype=torch.bool)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # unknown category, ragged boxes
            raise BadSample(BAD_ANNOTATION) from e
        if not torch.isfinite(boxes).all():
            raise BadSample(BAD_ANNOTATION)
        boxes, labels = xywh_to_xyxy(boxes[~crowd]), labels[~crowd]  # crowd regions are not targets
        # COCO boxes often poke a fraction of a pixel past the border: clip quietly, count real losses.
        clipped = clip_boxes(boxes, width, height)
        ok_raw, ok = keep_nondegenerate(boxes), keep_nondegenerate(clipped)
        for reason, n in (
            (DEGENERATE_BOX, int((~ok_raw).sum())),
            (BOX_OUTSIDE_IMAGE, int((ok_raw & ~ok).sum())),
        ):
            if n:
                stats.fixed[reason] += n
        return clipped[ok], labels[ok]

    def __call__(
        self,
        key: str,
        sample: dict[str, Any],
        rng: random.Random,
        stats: StreamStats,
        min_size: int | None = None,
    ) -> dict[str, Any]:
        """The processed sample; ``min_size``: the short side drawn for its batch (None: drawn here)."""
        meta = self._meta(sample)
        source, remap = self.sources[int(sample.get("__source__", 0))]
        classes = self.classes[int(sample.get("__source__", 0))]
        has_boxes, has_caption = record_tasks(meta)
        if "jpg" not in sample:
            raise BadSample(MISSING_JPEG)
        try:
            image = decode_rgb(sample["jpg"], (int(meta["width"]), int(meta["height"])))
        except SizeMismatchError as e:
            raise BadSample(SIZE_MISMATCH) from e
        except Exception as e:  # PIL raises many types for corrupt data
            raise BadSample(BAD_JPEG) from e
        w, h = image.size
        boxes, labels = self._targets(meta, w, h, stats, remap)
        if min_size is None:
            min_size = rng.choice(self.min_sizes)
        image, boxes = resize(image, boxes, min_size, self.max_size)
        flipped = self.hflip_prob > 0 and rng.random() < self.hflip_prob
        if flipped:
            image, boxes = hflip(image, boxes)
        keep = keep_nondegenerate(boxes)  # tiny boxes can shrink below a pixel when downscaled
        captions = list(meta["captions"]) if has_caption else []
        drawn = self._draw_captions(captions, rng)
        if flipped:
            drawn = [swap_left_right(c) for c in drawn]
        target = {"boxes": boxes[keep], "labels": labels[keep]}
        if classes is not None:  # a source of a mix that annotates only some classes
            target["classes"] = classes
        return {
            "image": to_uint8_tensor(image),
            "target": target,
            # Training: data.captions_per_image texts (all "" without a caption); evaluation: the first.
            "caption_texts": drawn,
            # Which losses this sample takes part in (a sample without box labels is not a negative).
            "tasks": (has_boxes, has_caption),
            "meta": {
                "source": source,
                "key": key,
                "image_id": int(meta["image_id"]),
                "orig_size": (h, w),
                "scale": min(min_size / min(h, w), self.max_size / max(h, w)),
                "flipped": flipped,
                "captions": captions,
            },
        }


@dataclass
class Batch:
    """A batch of B images as the streams hand it out (:func:`collate` makes it in the loader worker), the
    training loop (``ticod.train``), evaluation (``ticod.evaluate``) and the grounding metric consume it.

    The model takes its fields, never the batch (model code does not import data code). Fields that only a
    consumer of training batches needs have defaults, so a batch of images alone (prediction, tests) is
    ``Batch(images, image_sizes)``.
    """

    # (B, 3, H, W) uint8 pixels, zero-padded bottom/right to the largest image; the model normalises them
    # on its device (``TICOD.normalize``).
    images: torch.Tensor
    # Each image's (h, w) after resizing, before the padding.
    image_sizes: list[tuple[int, int]]
    # Per image: "boxes" (N, 4) float32 xyxy in the resized image's pixels, "labels" (N,) int64 in 1..K
    # and, in a mix whose sources annotate only some classes, "classes" (K + 1,) bool with background (the
    # classes its source annotates).
    targets: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # "input_ids" and "attention_mask", (B·k, T) int64: each image's k captions tokenised, image by image
    # (training: k = data.captions_per_image drawn from its captions; evaluation: k = 1, its first; "" when
    # it has none), padded right.
    captions: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per image, whether it is labelled for boxes / has a caption: the losses it takes part in (an image
    # without box labels is not a negative). Plain lists: the model indexes its sub-batches with them, no
    # device-to-host read. None: every image is labelled for both.
    has_boxes: list[bool] | None = None
    has_caption: list[bool] | None = None
    # Per image (:meth:`SampleProcessor.__call__`): "source" (its source's name in a mix, else ""), "key",
    # "image_id", "orig_size" (h, w) as decoded, "scale" (resized / original), "flipped", "captions" (all).
    meta: list[dict[str, Any]] = field(default_factory=list)
    # The worker's counts since its previous batch (:meth:`StreamStats.pop`): "read", "bad" and "fixed" by
    # reason, and "sources" (samples per source) in a mix.
    stats: dict[str, Any] = field(default_factory=dict)
    # Seconds the resumed train stream took to seek to its position: on its first batch only, else None.
    seek_s: float | None = None

    def _with_tensors(self, move: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A copy with ``move`` applied to every tensor (images, targets, captions); the rest shared."""
        return replace(
            self,
            images=move(self.images),
            targets=[{k: move(v) for k, v in t.items()} for t in self.targets],
            captions={k: move(v) for k, v in self.captions.items()},
        )

    def to(self, device: torch.device, non_blocking: bool = True) -> Batch:
        """The batch with its tensors on ``device`` (asynchronous from pinned memory unless not
        ``non_blocking``)."""
        return self._with_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch with its tensors in pinned memory: what the ``DataLoader`` calls with
        ``pin_memory=True`` (an object without this method would be handed over unpinned)."""
        return self._with_tensors(lambda t: t.pin_memory())


def collate(
    samples: Sequence[dict[str, Any]], tokenizer: Any, max_tokens: int, stats: dict[str, Any]
) -> Batch:
    """Processed samples -> a :class:`Batch` (uint8 images zero-padded bottom/right).

    The per-image boxes and labels are views into one tensor each, and ``input_ids``/``attention_mask`` views
    into one: a worker hands every tensor storage to the main process separately (a shared-memory file
    and a descriptor passed over a socket each), so 4 storages per batch instead of 2·B + 3 is what makes
    the transfer cheap (tools/bench/input.py measures it).
    """
    h = max((s["image"].shape[1] for s in samples), default=0)
    w = max((s["image"].shape[2] for s in samples), default=0)
    images = torch.zeros(len(samples), 3, h, w, dtype=torch.uint8)  # normalised by the model, on its device
    for i, s in enumerate(samples):
        images[i, :, : s["image"].shape[1], : s["image"].shape[2]] = s["image"]
    if samples:
        captions = encode_captions(tokenizer, [t for s in samples for t in s["caption_texts"]], max_tokens)
        ids_and_mask = torch.stack([captions["input_ids"], captions["attention_mask"]])
        captions = {"input_ids": ids_and_mask[0], "attention_mask": ids_and_mask[1]}
    else:
        captions = {k: torch.zeros(0, 0, dtype=torch.int64) for k in ("input_ids", "attention_mask")}
    counts = [len(s["target"]["boxes"]) for s in samples]
    boxes = torch.cat([s["target"]["boxes"].reshape(-1, 4) for s in samples] or [torch.zeros(0, 4)])
    labels = torch.cat([s["target"]["labels"] for s in samples] or [torch.zeros(0, dtype=torch.int64)])
    targets = [
        {"boxes": b, "labels": lab} for b, lab in zip(boxes.split(counts), labels.split(counts), strict=True)
    ]
    masks = [s["target"].get("classes") for s in samples]
    if any(m is not None for m in masks):  # a mix with per-source classes: one (B, K + 1) mask, every image
        every = torch.ones_like(next(m for m in masks if m is not None))
        for target, mask in zip(
            targets, torch.stack([every if m is None else m for m in masks]), strict=True
        ):
            target["classes"] = mask
    return Batch(
        images=images,
        image_sizes=[tuple(s["image"].shape[1:]) for s in samples],
        targets=targets,
        captions=captions,
        has_boxes=[bool(s["tasks"][0]) for s in samples],
        has_caption=[bool(s["tasks"][1]) for s in samples],
        meta=[s["meta"] for s in samples],
        stats=stats,
    )


def process_all(
    indexed: Iterable[tuple[int, dict[str, Any] | None]],
    process: SampleProcessor,
    rng: random.Random,
    stats: StreamStats,
    min_size: int | None = None,
) -> list[dict[str, Any]]:
    """Process a group of raw samples, dropping (and counting) the bad ones (``min_size``: see SampleProcessor)."""
    out = []
    for _, sample in indexed:
        if sample is None:  # lost with its shard: counted where it was read
            continue
        key = str(sample.get("__key__", "?"))
        try:
            out.append(process(key, sample, rng, stats, min_size))
            if out[-1]["meta"]["source"]:
                stats.sources[out[-1]["meta"]["source"]] += 1
        except BadSample as e:
            stats.bad[e.args[0]] += 1
            log.warning("skipping sample %s from %s: %s", key, sample.get("__url__"), e.args[0])
    return out


class Batcher:
    """Collate with the tokenizer bound (a picklable callable for spawned workers)."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, samples: list[dict[str, Any]], stats: dict[str, Any]) -> Batch:
        return collate(samples, self.tokenizer, self.max_tokens, stats)
