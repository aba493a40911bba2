"""ticod.data.transforms: exact box arithmetic of resize/flip, EXIF handling, normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ticod.data.coco import CategoryMap
from ticod.data.transforms import (
    SizeMismatchError,
    clip_boxes,
    decode_rgb,
    hflip,
    keep_nondegenerate,
    resize,
    resize_size,
    to_uint8_tensor,
    xywh_to_xyxy,
)


def jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def test_resize_size_short_side_and_cap() -> None:
    assert resize_size(100, 200, 50, 1000) == (50, 100)
    assert resize_size(100, 400, 80, 200) == (50, 200)  # long side capped
    assert resize_size(480, 640, 800, 1333) == (800, 1067)


def test_resize_and_flip_move_boxes_with_pixels() -> None:
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (10, 4, 20, 12))  # a red block at x 10..20, y 4..12
    boxes = torch.tensor([[10.0, 4.0, 20.0, 12.0]])
    big, big_boxes = resize(image, boxes, 40, 100)  # 20 -> 40: scale 2
    assert big.size == (80, 40) and big_boxes.tolist() == [[20.0, 8.0, 40.0, 24.0]]
    flipped, flipped_boxes = hflip(big, big_boxes)
    assert flipped_boxes.tolist() == [[40.0, 8.0, 60.0, 24.0]]
    red = torch.from_numpy(np.array(flipped))[..., 0] > 128
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (40, 60) and (ys.min().item(), ys.max().item() + 1) == (
        8,
        24,
    )


def test_box_helpers() -> None:
    xyxy = xywh_to_xyxy(torch.tensor([[1.0, 2.0, 3.0, 4.0], [-5.0, 0.0, 10.0, 0.5]]))
    assert xyxy.tolist() == [[1.0, 2.0, 4.0, 6.0], [-5.0, 0.0, 5.0, 0.5]]
    assert clip_boxes(xyxy, 3, 5).tolist() == [[1.0, 2.0, 3.0, 5.0], [0.0, 0.0, 3.0, 0.5]]
    assert keep_nondegenerate(xyxy).tolist() == [True, False]


def test_decode_grayscale_cmyk_and_exif_orientation() -> None:
    assert decode_rgb(jpeg(Image.new("L", (8, 6), 128))).mode == "RGB"
    cmyk = decode_rgb(jpeg(Image.new("CMYK", (8, 6), (0, 255, 255, 0))))
    assert cmyk.mode == "RGB" and cmyk.size == (8, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° (portrait)
    data = jpeg(Image.new("RGB", (8, 6)), exif=exif.tobytes())
    assert decode_rgb(data).size == (6, 8)  # as a viewer shows it
    assert decode_rgb(data, (6, 8)).size == (6, 8)  # annotations on the upright image
    assert decode_rgb(data, (8, 6)).size == (8, 6)  # annotations on the stored pixels
    with pytest.raises(SizeMismatchError):
        decode_rgb(data, (5, 5))


def test_uint8_tensor() -> None:
    x = to_uint8_tensor(Image.new("RGB", (3, 2), (255, 0, 51)))
    assert x.shape == (3, 2, 3) and x.dtype == torch.uint8
    assert x[:, 1, 2].tolist() == [255, 0, 51]


def test_category_map_non_contiguous_ids() -> None:
    cmap = CategoryMap(
        [{"id": 13, "name": "cross"}, {"id": 1, "name": "circle"}, {"id": 7, "name": "triangle"}]
    )
    assert len(cmap) == 3 and cmap.ids == [1, 7, 13]
    assert [cmap.to_label(i) for i in (1, 7, 13)] == [1, 2, 3]
    assert [cmap.to_category_id(label) for label in (1, 2, 3)] == [1, 7, 13]
    assert cmap.name(3) == "cross"
    with pytest.raises(KeyError):
        cmap.to_label(2)
    with pytest.raises(KeyError):
        cmap.to_category_id(0)


def test_flip_swaps_left_and_right_in_captions():
    from ticod.data.transforms import swap_left_right

    assert (
        swap_left_right("a red circle to the left of a blue square")
        == "a red circle to the right of a blue square"
    )
    assert swap_left_right("Left: a star; right: two crosses") == "Right: a star; left: two crosses"
    assert (
        swap_left_right("a star in the bottom right corner, leftmost")
        == "a star in the bottom left corner, rightmost"
    )
    assert swap_left_right("leftover bright lights") == "leftover bright lights"  # only whole words
