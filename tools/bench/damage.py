"""What damaged shard bytes cost: samples lost per pass, by reason (issue 27, point 2). Counts, not times.

``python tools/bench/damage.py [--demo DIR] [--flips 400] [--seed 0] [--passes 8]``

Two cases, each on a copy of demo data (``--demo``: a quickstart ``demo_data`` dir with ``coco/`` and
``shards/``; default: made here with tools/make_demo_coco.py, 100 train and 12 val images):

- ``--flips`` random bytes (seeded) flipped in train shard 0 (100 samples), read by the training loader
  for ``--passes`` passes over that one shard (batches of 8, a shuffle buffer of one shard) and once by the eval loader: the
  samples each pass lost, by reason.
- the first 12 val images written as one shard whose 4th sample's tar header (512 bytes) is overwritten:
  the images the eval loader hands out (those ``ticod.evaluate`` scores).

Run it on another checkout (``git stash`` the reader) to compare readers: it uses only the loaders' APIs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, machine_info, workdir

from ticod.config import load_config
from ticod.data.coco import load_records
from ticod.data.eval_stream import build_eval_loader
from ticod.data.shards import read_manifest, write_shards
from ticod.data.tokenizer import load_tokenizer, train_caption_tokenizer
from ticod.data.train_stream import build_train_loader

BATCH = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="", help="demo_data dir with coco/ and shards/ (default: make one)")
    p.add_argument("--flips", type=int, default=400, help="bytes flipped in train shard 0")
    p.add_argument("--seed", type=int, default=0, help="which bytes")
    p.add_argument("--passes", type=int, default=8, help="training passes over the damaged shard")
    p.add_argument("--out", default="bench_results/damage.json")
    return p.parse_args(argv)


def demo_data(root: Path, given: str) -> tuple[Path, Path]:
    """(coco dir, shards dir) of the demo: ``given`` or 100 train + 12 val images made here."""
    if given:
        return Path(given) / "coco", Path(given) / "shards"
    sys.path.insert(0, str(ROOT / "tools"))
    from make_demo_coco import make_demo_coco

    coco, shards = root / "coco", root / "shards"
    make_demo_coco(coco, 100, 12, 0)
    ann = coco / "annotations"
    records, cats = load_records(ann / "instances_train.json", ann / "captions_train.json")
    write_shards(records, cats, coco / "train", shards, "train", samples_per_shard=100, progress=False)
    train_caption_tokenizer([c for r in records for c in r["captions"]], shards / "tokenizer", 1000)
    return coco, shards


def one_shard_split(src: Path, split: str, index: int, out: Path, name: str) -> dict[str, Any]:
    """Copy shard ``index`` of ``split`` into ``out`` as the one shard of split ``name``; its entry."""
    manifest = read_manifest(src, split)
    entry = dict(manifest["shards"][index])
    shutil.copy(src / entry["name"], out / f"{name}-000000.tar")
    entry["name"] = f"{name}-000000.tar"
    manifest.update(split=name, shards=[entry], total_samples=entry["samples"])
    (out / f"{name}-manifest.json").write_text(json.dumps(manifest))
    return entry


def tally(batches: Any) -> tuple[int, int, Counter]:
    """(images handed out, samples read, bad samples by reason)."""
    images = read = 0
    bad: Counter = Counter()
    for b in batches:
        images += len(b.meta)
        read += b.stats["read"]
        bad.update(b.stats["bad"])
    return images, read, bad


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "bench": "damage",
        "args": vars(args),
        "machine": machine_info(torch.device("cpu")),
    }
    with workdir() as tmp:
        coco, shards = demo_data(tmp, args.demo)
        work = tmp / "damaged"
        work.mkdir()
        tok = load_tokenizer(shards / "tokenizer")

        # Case 1: random flips in one train shard.
        entry = one_shard_split(shards, "train", 0, work, "flipped")
        path = work / entry["name"]
        data = bytearray(path.read_bytes())
        rng = np.random.default_rng(args.seed)
        for at in rng.choice(len(data), size=args.flips, replace=False):
            data[at] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        n, kib = int(entry["samples"]), len(data) / 2**10
        sizes = [f"data.batch_size={BATCH}", f"data.shuffle_buffer={n}"]
        cfg = load_config(overrides=[f"data.shards_dir={work}", "data.num_workers=0", *sizes]).data
        batches = -(-n * args.passes // BATCH)
        loader = build_train_loader(cfg, tok, rank=0, world_size=1, seed=0, split="flipped")
        t_images, t_read, t_bad = tally(itertools.islice(loader, batches))
        e_images, e_read, e_bad = tally(build_eval_loader(cfg, tok, rank=0, world_size=1, split="flipped"))
        flips = {
            "shard_samples": n,
            "shard_kib": kib,
            "train": {"read": t_read, "images": t_images, "bad": dict(t_bad), "passes": t_read / n},
            "eval": {"read": e_read, "images": e_images, "bad": dict(e_bad)},
        }

        # Case 2: 12 val images in one shard, the 4th sample's header overwritten.
        ann = coco / "annotations"
        records, cats = load_records(ann / "instances_val.json", ann / "captions_val.json")
        val = tmp / "val12"
        write_shards(records[:12], cats, coco / "val", val, "val", samples_per_shard=12, progress=False)
        entry = read_manifest(val, "val")["shards"][0]
        path = val / entry["name"]
        data = bytearray(path.read_bytes())
        at = entry["offsets"][3]
        data[at : at + 512] = bytes(range(256)) * 2
        path.write_bytes(bytes(data))
        cfg = load_config(overrides=[f"data.shards_dir={val}", "data.num_workers=0"]).data
        v_images, v_read, v_bad = tally(build_eval_loader(cfg, tok, rank=0, world_size=1))
        header = {"images": 12, "scored": v_images, "read": v_read, "bad": dict(v_bad)}

    lost_train = sum(t_bad.values()) / max(1, t_read / n)
    print(f"\n**{args.flips} flipped bytes in one demo shard ({n} samples, {kib:.0f} KiB)**\n")
    print("| reader | samples read | images out | lost per pass | lost by reason |")
    print("|---|---|---|---|---|")
    print(f"| train, {t_read / n:.0f} passes | {t_read} | {t_images} | {lost_train:.1f} | {dict(t_bad)} |")
    print(f"| eval, 1 pass | {e_read} | {e_images} | {sum(e_bad.values())} | {dict(e_bad)} |")
    print("\n**12-image val shard, 4th sample's tar header overwritten**\n")
    print(f"images the eval loader hands out (scored): {v_images} of 12; lost by reason: {dict(v_bad)}")
    result.update(flipped_shard=flips, overwritten_header=header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
