"""Tiny random-init TICOD models for CPU tests: one place for their settings, a word tokenizer, a training
batch, and eval batches with ground truth made from the model's own predictions.

Test modules import from here, never from one another (see helpers.py).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from pathlib import Path

import torch
from pycocotools.coco import COCO
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from ticod.config import Config, load_config
from ticod.data.samples import Batch
from ticod.evaluate import to_records
from ticod.ground_truth import GroundTruth
from ticod.models import TICOD

NUM_CLASSES = 4
CATEGORY_IDS = [2, 5, 7, 11]  # original COCO ids of labels 1..4
CATEGORY_NAMES = ["bicycle", "bus", "train", "fire hydrant"]
VOCAB, BOS, EOS = 40, 1, 2
# Swin shapes: 16 wide with window 4 (the tests'), and configs/demo.yaml's 32 wide.
TINY_SWIN = {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 4}
DEMO_SWIN = {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "window_size": 4}


def swin_kwargs(kwargs: dict) -> str:
    """The ``model.backbone.kwargs=...`` override of these Swin shapes."""
    return "model.backbone.kwargs={" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"


# A CPU-sized model: 16-wide Swin with window 4, 32-channel FPN, 64-wide RoI heads, 2-layer GPT-2.
TINY_COMMON = [
    f"model.num_classes={NUM_CLASSES}",
    "model.fpn_channels=32",
    "model.backbone.name=swin_tiny_patch4_window7_224",
    "model.backbone.drop_path_rate=0.0",
    swin_kwargs(TINY_SWIN),
    "model.rpn.anchor_sizes=[16, 32, 64, 128, 256]",
    "model.rpn.pre_nms_top_n_test=200",
    "model.rpn.post_nms_top_n_test=50",
    "model.roi.representation_size=64",
    "model.captioner.n_layer=2",
    "model.captioner.n_head=2",
    "model.captioner.n_embd=32",
    "model.captioner.n_positions=32",
    "model.captioner.dropout=0.0",
]
# For training steps (losses, gradients): fewer sampled anchors and RoIs.
TINY = [
    *TINY_COMMON,
    "model.backbone.pretrained=false",
    "model.rpn.pre_nms_top_n_train=200",
    "model.rpn.post_nms_top_n_train=100",
    "model.rpn.batch_size_per_image=64",
    "model.roi.batch_size_per_image=64",
    "model.captioner.max_new_tokens=5",
]
# For evaluation and prediction: at most 20 detections and 6 caption tokens per image.
TINY_EVAL = [
    *TINY_COMMON,
    "model.roi.detections_per_img=20",
    "model.captioner.max_new_tokens=6",
    "data.max_caption_tokens=16",
]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


def build(*overrides: str, tokenizer=None) -> TICOD:
    """The TINY model, seeded, in training mode."""
    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    return TICOD(cfg.model, cfg.loss, VOCAB, BOS, EOS, EOS, tokenizer=tokenizer)


def eval_config(*overrides: str) -> Config:
    return load_config(None, [*TINY_EVAL, *overrides])


def build_eval_model(cfg: Config) -> TICOD:
    """The model of ``cfg`` (an :func:`eval_config`), seeded, in eval mode."""
    torch.manual_seed(0)
    return TICOD(cfg.model, cfg.loss, VOCAB, BOS, EOS, EOS).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words ``w3``..``w39`` as token ids 3..39, BOS 1, EOS 2 (also the padding)."""
    vocab = {"[PAD]": 0, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def batch(with_boxes: bool = True) -> Batch:
    """Two images of odd sizes zero-padded to the batch maximum, as the data pipeline collates them."""
    g = torch.Generator().manual_seed(4)
    sizes = [(70, 101), (53, 88)]
    images = torch.zeros(2, 3, 70, 101)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
    first = (
        torch.tensor([[5.0, 8.0, 40.0, 50.0], [30.0, 20.0, 95.0, 66.0]])
        if with_boxes
        else torch.zeros((0, 4))
    )
    targets = [
        {"boxes": first, "labels": torch.tensor([1, 4])[: len(first)]},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]
    captions = {
        "input_ids": torch.tensor([[BOS, 5, 6, 7, EOS], [BOS, 8, 9, EOS, EOS]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    }
    return Batch(images, sizes, targets, captions)


def batch_losses(model: torch.nn.Module, b: Batch) -> dict[str, torch.Tensor]:
    """The losses ``model`` (a TICOD, or an engine wrapping one) computes for a training batch."""
    return model(
        b.images,
        b.targets,
        b.captions,
        image_sizes=b.image_sizes,
        has_boxes=b.has_boxes,
        has_caption=b.has_caption,
    )


def partially_labelled(b: Batch, has_boxes: list[bool], has_caption: list[bool]) -> Batch:
    """``b`` as the data pipeline delivers partial labels: an empty target where an image has no boxes
    labelled, the tokenised "" caption (BOS EOS) where it has no caption, and the flags."""
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    ids, mask = b.captions["input_ids"].clone(), b.captions["attention_mask"].clone()
    for i, has in enumerate(has_caption):
        if not has:
            ids[i], mask[i] = EOS, 0
            ids[i, 0], mask[i, :2] = BOS, 1
    targets = [t if has else empty for t, has in zip(b.targets, has_boxes, strict=True)]
    captions = {"input_ids": ids, "attention_mask": mask}
    return replace(b, targets=targets, captions=captions, has_boxes=has_boxes, has_caption=has_caption)


# ------------------------------------------------------------------------- evaluation
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
NUM_IMAGES, BATCH = 7, 2  # 4 batches: ranks get uneven shares under world size 2 only by images (2+2 / 2+1)


def make_batches() -> list[Batch]:
    """Collated eval batches (the data interface) of random images of varied sizes; ids 1000, 1001, ..."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for start in range(0, NUM_IMAGES, BATCH):
        ids = list(range(1000 + start, 1000 + min(start + BATCH, NUM_IMAGES)))
        sizes = [(48 + 8 * (i % 3), 64 + 4 * (i % 4)) for i in ids]
        images = torch.zeros(len(ids), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
        for j, (h, w) in enumerate(sizes):
            images[j, :, :h, :w] = torch.randn(3, h, w, generator=g)
        meta = [
            {
                "key": f"{i:012d}",
                "image_id": i,
                "orig_size": (2 * h, 2 * w),  # the originals were downscaled by 2
                "scale": 0.5,
                "flipped": False,
                "captions": [],
            }
            for i, (h, w) in zip(ids, sizes, strict=True)
        ]
        batches.append(Batch(images, sizes, meta=meta, stats={"read": len(ids), "bad": {}}))
    return batches


def predict_batches(model: TICOD, batches: list[Batch]) -> list[list[dict]]:
    """The model's records of each batch, in this process (the reference)."""
    with torch.no_grad():
        return [
            to_records(
                model(b.images, image_sizes=b.image_sizes, orig_sizes=[m["orig_size"] for m in b.meta]),
                b.meta,
                word_tokenizer(),
            )
            for b in batches
        ]


def ground_truth_from(records: list[dict]) -> GroundTruth:
    """GT that matches part of the given predictions: AP and BLEU strictly between 0 and 1."""
    images, anns, refs = [], [], {}
    for n, rec in enumerate(records):
        image_id = rec["image_id"]
        images.append({"id": image_id, "width": 128, "height": 128})
        order = sorted(range(len(rec["scores"])), key=lambda i: -rec["scores"][i])
        hits = order[:2] if n % 2 == 0 else []  # even images: the two best boxes are correct
        for i in hits:
            x1, y1, x2, y2 = rec["boxes"][i]
            box = [x1, y1, x2 - x1, y2 - y1]
            cat = CATEGORY_IDS[rec["labels"][i] - 1]
            anns.append({"image_id": image_id, "category_id": cat, "bbox": box, "area": box[2] * box[3]})
        anns.append(  # a box nobody predicts
            {"image_id": image_id, "category_id": CATEGORY_IDS[n % 4], "bbox": [3, 3, 40, 30], "area": 1200.0}
        )
        refs[image_id] = [rec["caption"]] if n % 3 == 0 else ["w5 w6 w7 w8 w9 w10"]
        refs[image_id].append("w11 w12 " + rec["caption"])
    for k, a in enumerate(anns):
        a.update(id=k + 1, iscrowd=0)
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CATEGORY_NAMES, strict=True)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return GroundTruth(coco, refs, sorted(r["image_id"] for r in records))


def save_ground_truth(records: list[dict], directory: Path) -> str:
    """:func:`ground_truth_from` the records, saved for spawned ranks; returns the file."""
    gt = ground_truth_from(records)
    path = directory / "gt.pt"
    torch.save({"instances": gt.instances, "captions": gt.captions, "image_ids": gt.image_ids}, path)
    return str(path)
