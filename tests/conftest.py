"""Shared fixtures: a small demo COCO dataset and its shards (made once per test session, in seconds)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from slurm_cluster import LAUNCHER_VARS

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN, DEMO_VAL, DEMO_SEED = 24, 8, 0
DEMO_TRAIN_PER_SHARD, DEMO_VAL_PER_SHARD = 8, 3  # -> 3 train shards, 3 val shards (3 + 3 + 2 samples)
DEMO_VOCAB = 400
# 80 real COCO train2017 images with their boxes and captions: the team's share next to the checkout
# (TICOD_COCO_SAMPLE elsewhere). Never copied into the repository.
COCO_SAMPLE = Path(os.environ.get("TICOD_COCO_SAMPLE", ROOT.parent / "shared" / "coco_sample"))


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (a script, not a package) as a module; ``bench/common`` for tools/bench/."""
    module_name = name.replace("/", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the DeepSpeed CPU all-reduce buffers that the session's killed ranks left in /dev/shm."""
    from ticod.cpu_comm import sweep_dead_buffers

    sweep_dead_buffers(min_age_s=5)


@pytest.fixture(autouse=True)
def _launcher_vars_do_not_leak():
    """A test must not leave RANK/WORLD_SIZE/... in os.environ: every later subprocess inherits them (a
    Slurm job then takes them for a torchrun launch). Module fixtures may hold them for their module."""
    before = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    after = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    assert after == before, f"the test changed launcher variables in os.environ: {before} -> {after}"


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """The real COCO sample: ``images/``, ``instances_train2017.json``, ``captions_train2017.json`` (read-only).

    Skips the test with the reason where it is absent (a clone without ``../shared``).
    """
    if not (COCO_SAMPLE / "instances_train2017.json").is_file():
        pytest.skip(
            f"real COCO sample not found at {COCO_SAMPLE} (80 train2017 images: ../shared/coco_sample next "
            "to the checkout, or set TICOD_COCO_SAMPLE)"
        )
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def demo_coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo COCO data: ``train/`` (24 images), ``val/`` (8), ``annotations/{instances,captions}_{split}.json``.

    Six shape categories with ids 1, 3, 7, 8, 11, 13; images 96-192 px; includes empty images and crowd boxes
    for seed 0. Treat as read-only (session-scoped); copy it to modify.
    """
    out = tmp_path_factory.mktemp("demo_coco")
    load_tool("make_demo_coco").make_demo_coco(out, DEMO_TRAIN, DEMO_VAL, DEMO_SEED)
    return out


@pytest.fixture(scope="session")
def demo_shards_dir(demo_coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``demo_coco_dir`` sharded: ``train-00000{0,1,2}.tar`` (8 each), ``val-00000{0,1,2}.tar`` (3, 3, 2),
    both manifests, and a byte-level BPE trained on the train captions in ``<dir>/tokenizer``.

    Use with ``data.shards_dir=<dir>`` and ``data.tokenizer=<dir>/tokenizer`` (or ``data.tokenizer=''``,
    quoted: a bare ``data.tokenizer=`` is None). Read-only.
    """
    from ticod.data.coco import load_records
    from ticod.data.shards import write_shards
    from ticod.data.tokenizer import train_caption_tokenizer

    out = tmp_path_factory.mktemp("demo_shards")
    ann = demo_coco_dir / "annotations"
    for split, per_shard in (("train", DEMO_TRAIN_PER_SHARD), ("val", DEMO_VAL_PER_SHARD)):
        records, categories = load_records(ann / f"instances_{split}.json", ann / f"captions_{split}.json")
        write_shards(
            records,
            categories,
            demo_coco_dir / split,
            out,
            split,
            samples_per_shard=per_shard,
            progress=False,
        )
        if split == "train":
            train_caption_tokenizer(
                [c for r in records for c in r["captions"]], out / "tokenizer", DEMO_VOCAB
            )
    return out
