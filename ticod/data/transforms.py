"""Box-aware image transforms: EXIF-safe RGB decode, aspect-keeping resize, horizontal flip, uint8 tensor.

Boxes are float32 (N, 4) xyxy in pixels of the image they go with; every function returns the image and
boxes together so they cannot drift apart.
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps


class SizeMismatchError(ValueError):
    """The decoded image's size matches neither orientation the annotation could refer to."""


def decode_rgb(data: bytes, annotated_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode JPEG bytes to an RGB image (grayscale and CMYK converted), in the annotations' frame.

    EXIF orientation is applied (as a viewer shows the photo) unless the annotation's ``(width, height)``
    shows the boxes were drawn on the stored, unrotated pixels; a malformed EXIF block is ignored.

    Raises:
        PIL.UnidentifiedImageError / OSError: not a decodable image.
        SizeMismatchError: ``annotated_size`` fits neither the stored nor the EXIF-rotated image.
    """
    raw = Image.open(io.BytesIO(data))
    raw.load()
    try:
        # exif_transpose copies the image even when there is nothing to rotate: ask first.
        rotated = raw.getexif().get(ExifTags.Base.Orientation, 1) not in (None, 1)
        upright = ImageOps.exif_transpose(raw) if rotated else raw
    except Exception:  # corrupt EXIF must not cost us the image
        upright = raw
    image = upright
    if annotated_size is not None and upright.size != tuple(annotated_size):
        if raw.size != tuple(annotated_size):
            raise SizeMismatchError(f"image is {raw.size[0]}x{raw.size[1]}, annotation says {annotated_size}")
        image = raw  # boxes refer to the stored pixels
    return image if image.mode == "RGB" else image.convert("RGB")


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def keep_nondegenerate(boxes: torch.Tensor, min_side: float = 1.0) -> torch.Tensor:
    """Bool mask of boxes at least ``min_side`` pixels wide and high (torchvision rejects zero-size boxes)."""
    return ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)


def resize_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the short side ``min_size``, shrunk further if the long side would exceed ``max_size``."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(
    image: Image.Image, boxes: torch.Tensor, min_size: int, max_size: int
) -> tuple[Image.Image, torch.Tensor]:
    """Resize keeping the aspect ratio (see :func:`resize_size`); boxes scale per axis with the pixel grid."""
    w, h = image.size
    new_h, new_w = resize_size(h, w, min_size, max_size)
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    factors = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=torch.float32)
    return image, boxes * factors


def hflip(image: Image.Image, boxes: torch.Tensor) -> tuple[Image.Image, torch.Tensor]:
    """Mirror left-right: x1' = W - x2, x2' = W - x1."""
    w = image.size[0]
    flipped = boxes.clone()
    flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=\b|most\b)", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: "left" <-> "right" (case kept), as MDETR's flip does.

    A flipped image whose caption still says "a circle on the left" would teach the wrong side.
    """

    def swap(m: re.Match[str]) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, caption)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 (3, H, W) pixels of an RGB image.

    Workers hand images over as uint8 (a quarter of float32's bytes through shared memory, pinned memory and
    the host-to-device copy); the model normalises them on its device (``TICOD.normalize``).
    """
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
