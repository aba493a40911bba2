"""Inference on image files: ``python -m ticod.predict --checkpoint DIR IMAGE_OR_DIR... --out DIR``.

For every image writes ``OUT/<name>.json`` (boxes xyxy in original pixels, labels with category names,
scores, caption) and ``OUT/<name>.png`` (the image with boxes, labels and caption drawn). The checkpoint
is an export dir, a run dir or a checkpoint dir (see ``ticod.export.load_for_inference``). Images go
through the evaluation's own transforms (``ticod.data.transforms``: EXIF orientation applied, shorter side
to ``data.test_min_size``, longer side at most ``data.max_size``, uint8 pixels normalised by the model),
so a model sees a file exactly as it sees the same image in an eval shard; they run in batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ticod.config import ConfigError, DataConfig
from ticod.data.coco import label_categories
from ticod.data.samples import Batch
from ticod.data.transforms import decode_rgb, resize, to_uint8_tensor
from ticod.visualize import draw_predictions

log = logging.getLogger("ticod")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (sorted, recursively) in the named directories."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or directory")
    return found


def output_names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with a counter where two inputs share one (a/1.jpg, b/1.jpg)."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_image(path: Path) -> Image.Image:
    """An image file decoded as evaluation decodes shard JPEGs: RGB, upright by its EXIF orientation."""
    return decode_rgb(path.read_bytes())


def preprocess(images: Sequence[Image.Image], cfg: DataConfig) -> Batch:
    """Decoded images -> a batch of images alone as the eval pipeline makes it (images, image_sizes).

    The eval sample path (``ticod.data.samples.SampleProcessor`` without flip): ``resize`` to the short
    side ``test_min_size`` (long side at most ``max_size``), uint8 pixels, zero-padded bottom/right.
    """
    resized = []
    for image in images:
        image, _ = resize(image.convert("RGB"), torch.zeros(0, 4), cfg.test_min_size, cfg.max_size)
        resized.append(to_uint8_tensor(image))
    sizes = [(int(x.shape[1]), int(x.shape[2])) for x in resized]
    pixels = torch.zeros(
        len(resized), 3, max(h for h, _ in sizes), max(w for _, w in sizes), dtype=torch.uint8
    )
    for i, x in enumerate(resized):
        pixels[i, :, : x.shape[1], : x.shape[2]] = x
    return Batch(pixels, sizes)


def image_record(
    path: Path,
    size: tuple[int, int],
    output: dict[str, Any],
    category_ids: Sequence[int],
    category_names: Sequence[str],
    score_threshold: float,
) -> dict[str, Any]:
    """One image's predictions as JSON: detections above the threshold (best first) and the caption."""
    record: dict[str, Any] = {"file": str(path), "height": size[0], "width": size[1]}
    if "boxes" in output:
        detections = []
        for box, score, label in zip(
            output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist(), strict=True
        ):
            if score >= score_threshold:
                detections.append(
                    {
                        "box": [round(v, 2) for v in box],
                        "score": score,
                        "label": label,
                        "category_id": int(category_ids[label - 1]),
                        "category": category_names[label - 1],
                    }
                )
        record["detections"] = sorted(detections, key=lambda d: -d["score"])
    if "caption" in output:
        record["caption"] = output["caption"]
    return record


def render(image: Image.Image, record: dict[str, Any]) -> Image.Image:
    dets = record.get("detections", [])
    return draw_predictions(
        image,
        [d["box"] for d in dets],
        [d["category"] for d in dets],
        [d["score"] for d in dets],
        record.get("caption"),
    )


def predict(
    model: torch.nn.Module,
    data_cfg: DataConfig,
    categories: Sequence[dict[str, Any]],
    paths: Sequence[Path],
    out_dir: Path,
    *,
    batch_size: int,
    score_threshold: float,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Run ``model`` on ``paths`` in batches; write one JSON and one PNG per image; return the records.

    Args:
        model: An eval-mode TICOD built with a tokenizer (its outputs then carry caption strings).
        data_cfg: Resize and normalisation settings the model was trained with.
        categories: The run's categories (``{"id", "name"}`` in any order; labels follow sorted ids).
        paths: Image files.
        out_dir: Where ``<name>.json`` and ``<name>.png`` go.
        batch_size: Images per forward pass.
        score_threshold: Boxes scoring lower are left out of JSON and PNG.
        device: Device of the model.
    """
    category_ids, category_names = label_categories(categories)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    records = []
    model.eval()
    for chunk in batched(list(zip(paths, names, strict=True)), batch_size):
        images = [load_image(p) for p, _ in chunk]
        batch = preprocess(images, data_cfg)
        orig = [(im.height, im.width) for im in images]
        with torch.no_grad():
            outputs = model(batch.images.to(device), image_sizes=batch.image_sizes, orig_sizes=orig)
        for (path, name), image, size, output in zip(chunk, images, orig, outputs, strict=True):
            record = image_record(path, size, output, category_ids, category_names, score_threshold)
            (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
            render(image, record).save(out_dir / f"{name}.png")
            records.append(record)
            log.info("%s: %d boxes, %s", path, len(record.get("detections", [])), record.get("caption", ""))
    return records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export dir, run dir or checkpoint dir")
    p.add_argument("inputs", nargs="+", help="image files and/or directories of images")
    p.add_argument("--out", required=True, help="directory for the .json and .png files")
    p.add_argument("--beams", type=int, help="caption beam size (1 = greedy; default: the model's config)")
    p.add_argument("--max-new-tokens", type=int, help="caption length limit (default: the model's config)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep boxes scoring at least this")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    from ticod.export import load_for_inference  # after --help: it loads the model stack

    if args.batch_size < 1 or (args.beams is not None and args.beams < 1):
        print("error: --batch-size and --beams must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = []
    if args.beams is not None:
        overrides.append(f"model.captioner.num_beams={args.beams}")
    if args.max_new_tokens is not None:
        overrides.append(f"model.captioner.max_new_tokens={args.max_new_tokens}")
    try:
        paths = find_images(args.inputs)
        bundle = load_for_inference(args.checkpoint, device, overrides)
    except (FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    predict(
        bundle.model,
        bundle.cfg.data,
        bundle.categories,
        paths,
        Path(args.out),
        batch_size=args.batch_size,
        score_threshold=args.score_threshold,
        device=device,
    )
    print(f"{len(paths)} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
