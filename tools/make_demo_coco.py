"""Write a small, learnable demo dataset of coloured shapes in the exact MS-COCO layout.

``python tools/make_demo_coco.py --out DIR --train 1800 --val 100 --seed 0 [--min-size 96 --max-size 192]``
writes ``DIR/{train,val}/<id>.jpg`` and ``DIR/annotations/{instances,captions}_{train,val}.json`` with the
official COCO keys. Each image has 0-4 large shapes (6 categories with NON-contiguous ids, so that
id <-> label mapping bugs show) in 5 colours on a plain, gradient or noisy background, a few crowd
annotations (clusters of small dots, ``iscrowd=1``), and 5 captions stating what is there, how many, which
colour and where ("two red circles to the left of a blue square"). Output is a pure function of the
arguments: the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Non-contiguous like COCO's ids (1..90 with gaps).
CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 8, "name": "star", "supercategory": "shape"},
    {"id": 11, "name": "hexagon", "supercategory": "shape"},
    {"id": 13, "name": "cross", "supercategory": "shape"},
]
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
PLURALS |= {"hexagon": "hexagons", "cross": "crosses"}
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 30),
    "purple": (145, 50, 185),
}
NUMBERS = ["no", "one", "two", "three", "four", "five"]
SUPERSAMPLE = 2  # shapes are drawn at 2x and downsampled for anti-aliased edges
CROWD_FRACTION = 0.05  # images with a crowd annotation (a cluster of small dots)
EMPTY_FRACTION = 0.04  # images with no objects at all


@dataclass
class Shape:
    category: str
    colour: str
    box: tuple[float, float, float, float]  # x, y, w, h in pixels
    polygon: list[float]  # flat x0, y0, x1, y1, ... outline (COCO segmentation)

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


# ------------------------------------------------------------------------------------- drawing
def outline(category: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape of half-size ``r`` centred on (cx, cy); circles as a 32-gon."""

    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(phase + 2 * math.pi * k / n),
                cy + radius * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if category == "circle":
        return ring(32, r, 0.0)
    if category == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if category == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if category == "hexagon":
        return ring(6, r, 0.0)
    if category == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, 0.42 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if category == "cross":
        t = r / 3
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {category!r}")


def background(rng: random.Random, w: int, h: int) -> tuple[Image.Image, str]:
    """A neutral plain, gradient or noisy background (shapes stay in saturated colours) and its word."""
    base = np.array([rng.randint(150, 250)] * 3, dtype=np.float32) + [rng.randint(-15, 15) for _ in range(3)]
    kind = rng.choice(["plain", "gradient", "noisy"])
    if rng.random() < 0.25:
        base = base - 120  # some dark backgrounds
    img = np.broadcast_to(base, (h, w, 3)).copy()
    if kind == "gradient":
        other = base + rng.choice([-1, 1]) * rng.randint(40, 80)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.shape[0] == w else t[:, None, None]
        img = img * (1 - t) + other * t
    elif kind == "noisy":
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 14, (h, w, 1)).astype(np.float32)
        img = img + noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), kind


def covered_fraction(box: tuple[float, ...], others: list[tuple[float, ...]]) -> float:
    """Largest fraction of ``box`` that any single box in ``others`` covers."""
    x, y, w, h = box
    worst = 0.0
    for ox, oy, ow, oh in others:
        iw = max(0.0, min(x + w, ox + ow) - max(x, ox))
        ih = max(0.0, min(y + h, oy + oh) - max(y, oy))
        worst = max(worst, iw * ih / min(w * h, ow * oh))
    return worst


def place_shapes(rng: random.Random, w: int, h: int, n: int) -> list[Shape]:
    """Up to ``n`` shapes, 15-50% of the short side, overlapping at most a third of the smaller one."""
    shapes: list[Shape] = []
    side = min(w, h)
    for _ in range(n):
        for _attempt in range(30):
            r = rng.uniform(0.15, 0.5) * side / 2
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            category = rng.choice(CATEGORIES)["name"]
            pts = outline(category, cx, cy, r)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
            if covered_fraction(box, [s.box for s in shapes]) <= 0.33:
                colour = rng.choice(list(COLOURS))
                shapes.append(Shape(category, colour, box, [c for p in pts for c in p]))
                break
    return shapes


def draw(img: Image.Image, shapes: list[Shape], dots: list[tuple[float, float, float, str]]) -> Image.Image:
    big = img.resize((img.width * SUPERSAMPLE, img.height * SUPERSAMPLE), Image.Resampling.NEAREST)
    pen = ImageDraw.Draw(big)
    for x, y, r, colour in dots:
        s = SUPERSAMPLE
        pen.ellipse([(x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s], fill=COLOURS[colour])
    for shape in shapes:
        pts = shape.polygon
        pen.polygon(
            [(pts[i] * SUPERSAMPLE, pts[i + 1] * SUPERSAMPLE) for i in range(0, len(pts), 2)],
            fill=COLOURS[shape.colour],
        )
    return big.resize(img.size, Image.Resampling.BOX)


def crowd_dots(
    rng: random.Random, w: int, h: int
) -> tuple[list[tuple[float, float, float, str]], tuple[float, ...]]:
    """A cluster of small same-coloured dots (annotated as one iscrowd box) and its box."""
    colour = rng.choice(list(COLOURS))
    bw, bh = rng.uniform(0.2, 0.35) * w, rng.uniform(0.2, 0.35) * h
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    r = max(1.5, min(w, h) * 0.02)
    dots = [
        (rng.uniform(x0 + r, x0 + bw - r), rng.uniform(y0 + r, y0 + bh - r), r, colour) for _ in range(12)
    ]
    xs, ys = [d[0] for d in dots], [d[1] for d in dots]
    box = (min(xs) - r, min(ys) - r, max(xs) - min(xs) + 2 * r, max(ys) - min(ys) + 2 * r)
    return dots, box


# ------------------------------------------------------------------------------------ captions
def phrase(count: int, colour: str, category: str) -> str:
    if count == 1:
        return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {category}"
    return f"{NUMBERS[count]} {colour} {PLURALS[category]}"


def join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def where(cx: float, cy: float, w: int, h: int) -> str:
    """Coarse position of a point: 'at the top', 'on the left', 'in the bottom right corner', ..."""
    col = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else ""
    row = "top" if cy < h / 3 else "bottom" if cy > 2 * h / 3 else ""
    if row and col:
        return f"in the {row} {col} corner"
    if row:
        return f"at the {row}"
    return f"on the {col}" if col else "in the middle"


def relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where ``a`` is relative to ``b``, along the dominant axis."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def captions_for(rng: random.Random, shapes: list[Shape], bg: str, w: int, h: int) -> list[str]:
    """Five different captions saying what is there, how many, which colour and where."""
    if not shapes:
        pool = [
            f"an empty {bg} background",
            "a picture with no shapes",
            f"nothing but a {bg} background",
            "an image without any objects",
            f"a blank {bg} picture",
            "there are no shapes in this image",
        ]
        return rng.sample(pool, 5)
    groups: dict[tuple[str, str], list[Shape]] = {}
    for s in sorted(shapes, key=lambda s: s.center[0]):  # left to right reads naturally
        groups.setdefault((s.colour, s.category), []).append(s)
    names = [phrase(len(g), c, k) for (c, k), g in groups.items()]
    centers = [
        (sum(s.center[0] for s in g) / len(g), sum(s.center[1] for s in g) / len(g)) for g in groups.values()
    ]
    everything = join(names)
    n = len(shapes)
    total = f"{NUMBERS[n]} {'shape' if n == 1 else 'shapes'}"
    pool = [
        f"a picture of {everything}",
        f"an image with {everything}",
        f"{everything} on a {bg} background",
        f"there {'is' if n == 1 else 'are'} {total}: {everything}",
        f"{total} on a {bg} background",
        f"{names[0]} {where(*centers[0], w, h)}",
        f"a picture with {names[-1]} {where(*centers[-1], w, h)}",
    ]
    if len(groups) >= 2:
        i, j = rng.sample(range(len(groups)), 2)
        pool += [
            f"{names[i]} {relation(centers[i], centers[j])} {names[j]}",
            f"{names[0]} {relation(centers[0], centers[-1])} {names[-1]}",
        ]
        colours = sorted({c for c, _ in groups})
        pool.append(
            f"{join(colours)} shapes on a {bg} background" if len(colours) > 1 else f"{total} in {colours[0]}"
        )
    else:
        pool.append(f"a single group: {everything} {where(*centers[0], w, h)}")
    pool = list(dict.fromkeys(pool))  # drop duplicates, keep order
    return rng.sample(pool, 5)


# ------------------------------------------------------------------------------------ dataset
def make_split(
    out: Path, split: str, image_ids: list[int], rng: random.Random, min_size: int, max_size: int, ann_id: int
) -> int:
    """Write one split's JPEGs and COCO JSON files; returns the next free annotation id."""
    (out / split).mkdir(parents=True, exist_ok=True)
    images, instances, captions = [], [], []
    cap_id = ann_id
    for image_id in image_ids:
        w, h = rng.randint(min_size, max_size), rng.randint(min_size, max_size)
        bg_img, bg = background(rng, w, h)
        n = 0 if rng.random() < EMPTY_FRACTION else rng.choice([1, 1, 2, 2, 3, 4])
        shapes = place_shapes(rng, w, h, n)
        dots, crowd_box = crowd_dots(rng, w, h) if shapes and rng.random() < CROWD_FRACTION else ([], None)
        file_name = f"{image_id:012d}.jpg"
        draw(bg_img, shapes, dots).save(out / split / file_name, quality=90)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": w,
                "height": h,
                "license": 1,
                "date_captured": "2024-01-01 00:00:00",
                "coco_url": "",
                "flickr_url": "",
            }
        )
        if crowd_box is not None:
            x, y, bw, bh = (round(v, 2) for v in crowd_box)
            cat = next(c["id"] for c in CATEGORIES if c["name"] == "circle")
            rle = {"size": [h, w], "counts": crowd_rle(crowd_box, w, h)}
            instances.append(crowd_annotation(ann_id, image_id, cat, [x, y, bw, bh], rle))
            ann_id += 1
        for s in shapes:
            cat = next(c["id"] for c in CATEGORIES if c["name"] == s.category)
            instances.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": [[round(v, 2) for v in s.polygon]],
                    "area": round(polygon_area(s.polygon), 2),
                    "bbox": [round(v, 2) for v in s.box],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        for text in captions_for(rng, shapes, bg, w, h):
            captions.append({"id": cap_id, "image_id": image_id, "caption": text})
            cap_id += 1
    header = {
        "info": {
            "description": "TICOD demo shapes (synthetic, COCO format)",
            "version": "1.0",
            "year": 2024,
            "contributor": "tools/make_demo_coco.py",
            "date_created": "2024-01-01",
        },
        "licenses": [
            {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "images": images,
    }
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    inst = {**header, "annotations": instances, "categories": CATEGORIES}
    (ann_dir / f"instances_{split}.json").write_text(json.dumps(inst))
    (ann_dir / f"captions_{split}.json").write_text(json.dumps({**header, "annotations": captions}))
    return max(ann_id, cap_id)


def crowd_annotation(ann_id: int, image_id: int, cat: int, box: list[float], rle: dict) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": rle,
        "area": round(box[2] * box[3], 2),
        "bbox": box,
        "iscrowd": 1,
    }


def crowd_rle(box: tuple[float, ...], w: int, h: int) -> list[int]:
    """Uncompressed column-major RLE of the crowd box (COCO's crowd segmentation format)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    x, y, bw, bh = (round(v) for v in box)
    mask[y : y + bh, x : x + bw] = 1
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return [int(c) for c in counts]


def polygon_area(flat: list[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2


def make_demo_coco(
    out: str | Path,
    n_train: int = 1800,
    n_val: int = 100,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 192,
) -> Path:
    """Write the demo dataset under ``out`` and return its path."""
    if not 32 <= min_size <= max_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size}, {max_size}")
    out = Path(out)
    rng = random.Random(seed)
    # COCO image ids are sparse; sampling them makes "id == index" assumptions fail loudly.
    ids = rng.sample(range(1, 1_000_000), n_train + n_val)
    train_ids, val_ids = sorted(ids[:n_train]), sorted(ids[n_train:])
    next_id = make_split(out, "train", train_ids, random.Random(f"{seed}-train"), min_size, max_size, 1)
    make_split(out, "val", val_ids, random.Random(f"{seed}-val"), min_size, max_size, next_id)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset root (train/, val/, annotations/)")
    p.add_argument("--train", type=int, default=1800, help="number of train images")
    p.add_argument("--val", type=int, default=100, help="number of val images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=96, help="smallest image side in pixels")
    p.add_argument("--max-size", type=int, default=192, help="largest image side in pixels")
    a = p.parse_args(argv)
    out = make_demo_coco(a.out, a.train, a.val, a.seed, a.min_size, a.max_size)
    print(f"wrote {a.train} train and {a.val} val images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
