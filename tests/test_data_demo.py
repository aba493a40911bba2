"""Demo dataset and shard fixtures: COCO layout, official keys, determinism, non-contiguous ids."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import DEMO_TRAIN, DEMO_VAL


def test_demo_fixture_layout(demo_coco_dir: Path, demo_shards_dir: Path) -> None:
    inst = json.loads((demo_coco_dir / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in inst["categories"]] == [1, 3, 7, 8, 11, 13]
    assert len(inst["images"]) == DEMO_TRAIN
    assert sorted(p.name for p in demo_shards_dir.glob("*.tar")) == [
        *(f"train-00000{i}.tar" for i in range(3)),
        *(f"val-00000{i}.tar" for i in range(3)),
    ]
    val = json.loads((demo_shards_dir / "val-manifest.json").read_text())
    assert [s["samples"] for s in val["shards"]] == [3, 3, 2] and val["total_samples"] == DEMO_VAL
    assert (demo_shards_dir / "tokenizer" / "tokenizer.json").is_file()
