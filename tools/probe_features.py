"""Linear probe: which feature maps of a trained TICOD hold the object class the captioner must name.

``python tools/probe_features.py --checkpoint RUN --coco DIR [--target colour] [--train-images 400] [--out probe.json]``

For images with exactly one (non-crowd) object in a COCO-format dataset (``DIR/{train,val}`` and
``DIR/annotations/instances_{train,val}.json``, as ``tools/make_demo_coco.py`` writes), each backbone stage
and FPN level is read at the object's box (RoIAlign to 2x2) and averaged over the whole map; a linear
classifier fitted on the train images predicts the object's class on the val images. A map the probe cannot
read the class from is one a decoder cross-attending to it cannot name the object from (docs/quality.md).
``--target colour`` predicts the object's colour instead (the colour word its captions share; demo data):
a decoder finds the object a caption's colour word names on the maps that hold the colour.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from make_demo_coco import COLOURS
from PIL import Image
from torchvision.ops import roi_align

from ticod.export import load_for_inference
from ticod.models.ticod import pad_to_multiple
from ticod.predict import preprocess


def colour_of(captions: list[str]) -> str | None:
    """The one colour word the captions of a single-object image name (None: none or several)."""
    named = {c for c in COLOURS for text in captions if c in text.split()}
    return named.pop() if len(named) == 1 else None


def features(
    bundle, coco: Path, split: str, limit: int, target: str = "class"
) -> tuple[dict[str, torch.Tensor], list[int | str]]:
    """Per map, one row per single-object image: the box's 2x2 RoIAlign and the map's mean."""
    inst = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
    captions = collections.defaultdict(list)
    if target == "colour":
        for a in json.loads((coco / "annotations" / f"captions_{split}.json").read_text())["annotations"]:
            captions[a["image_id"]].append(a["caption"])
    files = {i["id"]: i["file_name"] for i in inst["images"]}
    objects = collections.defaultdict(list)
    for a in inst["annotations"]:
        if not a.get("iscrowd"):
            objects[a["image_id"]].append(a)
    model, rows, labels = bundle.model, collections.defaultdict(list), []
    for image_id, anns in objects.items():
        if len(anns) != 1 or len(labels) >= limit:
            continue
        label = anns[0]["category_id"] if target == "class" else colour_of(captions[image_id])
        if label is None:
            continue
        image = Image.open(coco / split / files[image_id]).convert("RGB")
        batch = preprocess([image], bundle.cfg.data)
        scale = batch.image_sizes[0][0] / image.height
        x, y, w, h = (v * scale for v in anns[0]["bbox"])
        box = torch.tensor([[0.0, x, y, x + w, y + h]])
        with torch.no_grad():
            padded = pad_to_multiple(
                model.normalize(batch.images, batch.image_sizes), model.backbone.size_divisor
            )
            stages = model.backbone(padded)
            maps = {f"stage{k}": v for k, v in stages.items()}
            if model.detector is not None:
                maps |= {f"fpn{k}": v for k, v in model.detector.fpn(stages).items() if k != "pool"}
        for name, f in maps.items():
            rows[f"{name} box"].append(
                roi_align(f, box, (2, 2), f.shape[-1] / padded.shape[-1], aligned=True).flatten()
            )
            rows[f"{name} mean"].append(f.mean((2, 3)).flatten())
        labels.append(label)
    return {k: torch.stack(v) for k, v in rows.items()}, labels


def probe(train: torch.Tensor, y_train: torch.Tensor, val: torch.Tensor, classes: int) -> torch.Tensor:
    """Val predictions of a softmax classifier on standardised features (Adam, 300 full-batch steps)."""
    torch.manual_seed(0)
    mean, std = train.mean(0), train.std(0) + 1e-6
    linear = torch.nn.Linear(train.shape[1], classes)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear((train - mean) / std), y_train).backward()
        opt.step()
    with torch.no_grad():
        return linear((val - mean) / std).argmax(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="export dir, run dir or checkpoint dir")
    p.add_argument(
        "--coco", type=Path, required=True, help="COCO-format dataset dir (train, val, annotations)"
    )
    p.add_argument("--target", choices=("class", "colour"), default="class", help="what the probe predicts")
    p.add_argument("--train-images", type=int, default=400, help="single-object train images to fit on")
    p.add_argument("--out", type=Path, help="write the accuracies as JSON here")
    args = p.parse_args(argv)
    bundle = load_for_inference(args.checkpoint)
    bundle.model.eval()
    x_train, y_train = features(bundle, args.coco, "train", args.train_images, args.target)
    x_val, y_val = features(bundle, args.coco, "val", 10**9, args.target)
    index = {c: i for i, c in enumerate(sorted(set(y_train)))}
    y_train_t = torch.tensor([index[c] for c in y_train])
    y_val_t = torch.tensor([index.get(c, -1) for c in y_val])
    result = {}
    print(f"{len(y_train)} train / {len(y_val)} val single-object images, {len(index)} {'classes' if args.target == 'class' else 'colours'} "
          f"(chance {1 / len(index):.2f})\n{'map':<14} {'features':>8} {'val accuracy':>13}")  # fmt: skip
    for name in x_train:
        predicted = probe(x_train[name], y_train_t, x_val[name], len(index))
        result[name] = (predicted == y_val_t).float().mean().item()
        print(f"{name:<14} {x_train[name].shape[1]:>8} {result[name]:>13.2f}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"checkpoint": str(args.checkpoint), "target": args.target, "val_accuracy": result}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
