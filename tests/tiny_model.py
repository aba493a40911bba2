"""Tiny random-init TICOD models for CPU tests: one place for their settings, a word tokenizer and a batch.

Test modules import from here, never from one another (see helpers.py).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from ticod.config import Config, load_config
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


def batch(with_boxes: bool = True) -> dict:
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
    return {"images": images, "image_sizes": sizes, "targets": targets, "captions": captions}


def partially_labelled(b: dict, has_boxes: list[bool], has_caption: list[bool]) -> dict:
    """``b`` as the data pipeline delivers partial labels: an empty target where an image has no boxes
    labelled, the tokenised "" caption (BOS EOS) where it has no caption, and the flags."""
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    ids, mask = b["captions"]["input_ids"].clone(), b["captions"]["attention_mask"].clone()
    for i, has in enumerate(has_caption):
        if not has:
            ids[i], mask[i] = EOS, 0
            ids[i, 0], mask[i, :2] = BOS, 1
    targets = [t if has else empty for t, has in zip(b["targets"], has_boxes, strict=True)]
    captions = {"input_ids": ids, "attention_mask": mask}
    return {**b, "targets": targets, "captions": captions, "has_boxes": has_boxes, "has_caption": has_caption}
