"""Overfitting check: the tiny demo model memorises a few demo images — boxes, labels and a caption each.

Reads the demo shards directly in the fixed shard format (``{split}-000000.tar`` with ``.jpg`` + ``.json``
per sample, categories in ``{split}-manifest.json``), so it depends only on the data interface.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import DEMO_SWIN, swin_kwargs
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import Whitespace
from torchvision.ops import box_iou

from ticod.config import load_config
from ticod.models import TICOD

# The CPU demo model (the model part of configs/demo.yaml); dropout and drop path off to memorise fast.
DEMO_MODEL = [
    "model.fpn_channels=64",
    "model.backbone.name=swin_tiny_patch4_window7_224",
    "model.backbone.pretrained=false",
    "model.backbone.drop_path_rate=0.0",
    swin_kwargs(DEMO_SWIN),
    "model.rpn.anchor_sizes=[16, 32, 64, 128, 256]",
    "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=150",
    "model.rpn.pre_nms_top_n_test=300",
    "model.rpn.post_nms_top_n_test=100",
    "model.rpn.batch_size_per_image=128",
    "model.roi.batch_size_per_image=128",
    "model.roi.representation_size=256",
    "model.captioner.n_layer=2",
    "model.captioner.n_head=4",
    "model.captioner.n_embd=128",
    "model.captioner.n_positions=40",
    "model.captioner.dropout=0.0",
    "model.captioner.max_new_tokens=30",
]
NUM_IMAGES = 4
STEPS = 150
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def read_samples(shards_dir: Path, split: str, n: int) -> tuple[list[dict], list[int]]:
    """The first ``n`` samples with at least one usable box, and the sorted category ids."""
    manifest = json.loads((shards_dir / f"{split}-manifest.json").read_text())
    category_ids = sorted(c["id"] for c in manifest["categories"])
    files: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shards_dir / manifest["shards"][0]["name"]) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            files.setdefault(key, {})[ext] = tar.extractfile(member).read()
    samples = []
    for key in sorted(files):
        meta = json.loads(files[key]["json"])
        image = np.asarray(Image.open(io.BytesIO(files[key]["jpg"])).convert("RGB"))
        keep = [
            i
            for i, (b, crowd) in enumerate(zip(meta["boxes"], meta["iscrowd"], strict=True))
            if not crowd and b[2] >= 1 and b[3] >= 1
        ]
        if not keep:
            continue
        boxes = torch.tensor([meta["boxes"][i] for i in keep], dtype=torch.float32)
        samples.append(
            {
                "image": (torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255 - MEAN) / STD,
                "boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1),  # xywh -> xyxy
                "labels": torch.tensor([category_ids.index(meta["category_ids"][i]) + 1 for i in keep]),
                "caption": meta["captions"][0],
            }
        )
        if len(samples) == n:
            break
    return samples, category_ids


def word_tokenizer(captions: list[str]) -> Tokenizer:
    words = sorted({w for c in captions for w, _ in Whitespace().pre_tokenize_str(c.lower())})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.normalizer = Lowercase()
    tok.pre_tokenizer = Whitespace()
    return tok


def collate(samples: list[dict], tok: Tokenizer) -> dict:
    """Pad images bottom/right and captions right, as the data pipeline's collate does."""
    h = max(s["image"].shape[1] for s in samples)
    w = max(s["image"].shape[2] for s in samples)
    images = torch.zeros(len(samples), 3, h, w)
    for i, s in enumerate(samples):
        images[i, :, : s["image"].shape[1], : s["image"].shape[2]] = s["image"]
    ids = [[1, *tok.encode(s["caption"]).ids, 2] for s in samples]
    length = max(map(len, ids))
    return {
        "images": images,
        "image_sizes": [tuple(s["image"].shape[1:]) for s in samples],
        "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
        "captions": {
            "input_ids": torch.tensor([x + [2] * (length - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids]),
        },
        "caption_ids": [x[1:-1] for x in ids],
    }


@pytest.mark.slow
@pytest.mark.parallel_ok  # one process
def test_tiny_model_memorises_boxes_and_captions_of_demo_images(demo_shards_dir):
    samples, category_ids = read_samples(Path(demo_shards_dir), "train", NUM_IMAGES)
    assert len(samples) == NUM_IMAGES
    tok = word_tokenizer([s["caption"] for s in samples])
    batch = collate(samples, tok)
    cfg = load_config(None, [*DEMO_MODEL, f"model.num_classes={len(category_ids)}"])
    torch.manual_seed(0)
    model = TICOD(cfg.model, cfg.loss, tok.get_vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    history = []
    model.train()
    for _ in range(STEPS):
        losses = model(batch["images"], batch["targets"], batch["captions"], image_sizes=batch["image_sizes"])
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({k: losses[k].item() for k in ("loss_det", "loss_cap")})

    first, last = history[0], {k: np.mean([h[k] for h in history[-10:]]) for k in history[0]}
    assert last["loss_det"] < 0.15 * first["loss_det"], (first, last)
    assert last["loss_cap"] < 0.05 * first["loss_cap"], (first, last)

    model.eval()
    with torch.no_grad():
        outputs = model(batch["images"], image_sizes=batch["image_sizes"])
    for out, target, caption_ids in zip(outputs, batch["targets"], batch["caption_ids"], strict=True):
        assert out["caption_ids"].tolist() == caption_ids  # the training caption, token for token
        confident = out["scores"] > 0.5
        iou = box_iou(target["boxes"], out["boxes"][confident])
        same_label = target["labels"][:, None] == out["labels"][confident][None, :]
        assert ((iou > 0.5) & same_label).any(dim=1).all(), (target, out)
