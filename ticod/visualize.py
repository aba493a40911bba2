"""Render predictions: boxes with "label score" tags (torchvision's ``draw_bounding_boxes``) and the caption.

Used by ``ticod.predict`` for its PNGs and by the evaluation for the sample images logged to wandb.
"""

from __future__ import annotations

import functools
import hashlib
import textwrap
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

# Distinct, readable on photos (matplotlib's tab10).
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


@functools.cache
def font_path() -> str | None:
    """A scalable TrueType font (matplotlib's bundled DejaVu Sans); None falls back to PIL's default font."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except ImportError:
        return None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    path = font_path()
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


def label_color(name: str) -> tuple[int, int, int]:
    """The same colour for a class in every image (hash of the name, stable across runs unlike ``hash``)."""
    return PALETTE[int(hashlib.md5(name.encode()).hexdigest(), 16) % len(PALETTE)]


def draw_predictions(
    image: Image.Image,
    boxes: torch.Tensor | Sequence[Sequence[float]],
    labels: Sequence[str],
    scores: Sequence[float] | torch.Tensor | None = None,
    caption: str | None = None,
) -> Image.Image:
    """Draw boxes tagged "label score" on a copy of ``image`` and the caption in a band below it.

    Args:
        image: The original image (boxes are in its pixels).
        boxes: (n, 4) xyxy.
        labels: n display names (category names).
        scores: n scores, shown after the names when given.
        caption: Text for the band under the image; None adds no band.

    Returns:
        A new RGB image: the same size as ``image``, taller by the caption band when there is a caption.
    """
    rgb = image.convert("RGB")
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels / {len(scores or [])} scores")
    size = max(10, min(rgb.size) // 40)  # readable on thumbnails and on full-size COCO images
    if len(boxes):
        tags = (
            list(labels)
            if scores is None
            else [f"{n} {float(s):.2f}" for n, s in zip(labels, scores, strict=True)]
        )
        drawn = draw_bounding_boxes(
            pil_to_tensor(rgb),
            boxes,
            labels=tags,
            colors=[label_color(n) for n in labels],
            width=max(1, size // 6),
            font=font_path(),
            font_size=size,
            label_background_colors=[label_color(n) for n in labels],
            label_colors="white",
            fill_labels=True,
        )
        rgb = to_pil_image(drawn)
    if caption is None:
        return rgb
    return _add_caption_band(rgb, caption, _font(size + 2))


def _add_caption_band(
    image: Image.Image, caption: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> Image.Image:
    """Append a white band with ``caption`` wrapped to the image width."""
    margin = max(4, font.size // 2) if hasattr(font, "size") else 4
    sample = "a man riding a horse on the beach "  # average width of caption-like text
    char_w = max(1.0, font.getlength(sample) / len(sample))
    lines = textwrap.wrap(caption, width=max(8, int((image.width - 2 * margin) / char_w))) or [""]
    line_h = font.getbbox("Ag")[3] + margin // 2
    band = Image.new("RGB", (image.width, image.height + len(lines) * line_h + 2 * margin), "white")
    band.paste(image, (0, 0))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((margin, image.height + margin + i * line_h), line, fill="black", font=font)
    return band
