"""Shared fixtures: a small demo COCO dataset and its shards (made once per test session, in seconds), the
real COCO sample, a one-rank process group. Shared functions and constants are in helpers.py."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
from pathlib import Path

import pytest
from helpers import (
    DEMO_SEED,
    DEMO_TRAIN,
    DEMO_TRAIN_PER_SHARD,
    DEMO_VAL,
    DEMO_VAL_PER_SHARD,
    DEMO_VOCAB,
    ROOT,
    load_tool,
    shard_demo_coco,
)
from slurm_cluster import LAUNCHER_VARS

SERIAL = "serial"  # the pytest-xdist group of the tests that must not run beside each other

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Under pytest-xdist: this worker's share of the cores for torch in this process (read at torch's import,
    # which comes after this file's). Trainers the tests start set their own (helpers.train_env).
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


@pytest.hookimpl(tryfirst=True)  # xdist's worker reads the groups in its own hook of this name
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--dist loadgroup`` (launch/test.sh), run the multi-process and Slurm tests one at a time on
    one worker: they use every core, wait on timeouts measured in seconds and bring up one cluster. The
    tests that time themselves are marked ``serial`` and join them. The other tests (also the slow ones of
    one process, marked ``parallel_ok``) share the other workers."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        slow = item.get_closest_marker("slow") and not item.get_closest_marker("parallel_ok")
        if slow or item.get_closest_marker("slurm") or item.get_closest_marker("serial"):
            item.add_marker(pytest.mark.xdist_group(SERIAL))


def pytest_configure(config: pytest.Config) -> None:
    """Refuse ``--dist loadgroup`` where pytest-xdist cannot group: it passes a test's group to its scheduler as
    an ``@group`` suffix of the node id, which pytest 9.2 no longer lets it set (pytest-xdist#1386, open in
    3.8). The serial tests would run beside each other on every worker, and nothing would say so."""
    if config.getoption("dist", None) != "loadgroup" or pytest.version_tuple[:2] < (9, 2):
        return
    xdist = importlib.metadata.version("pytest-xdist")
    if tuple(int(p) for p in xdist.split(".")[:2]) <= (3, 8):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {xdist} ignores "
            "--dist loadgroup's groups (pytest-xdist#1386): install the lock, pip install -c constraints.txt -e .[dev]"
        )


# 80 real COCO train2017 images with their boxes and captions: the team's share next to the checkout
# (TICOD_COCO_SAMPLE elsewhere). Never copied into the repository.
COCO_SAMPLE = Path(os.environ.get("TICOD_COCO_SAMPLE", ROOT.parent / "shared" / "coco_sample"))


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
    out = tmp_path_factory.mktemp("demo_shards")
    per_shard = {"train": DEMO_TRAIN_PER_SHARD, "val": DEMO_VAL_PER_SHARD}
    return shard_demo_coco(demo_coco_dir, out, per_shard, DEMO_VOCAB)


_PG_PORT: list[int] = []  # the port of the session's one-rank group


@pytest.fixture(scope="module")
def single_rank_pg():
    """A one-rank gloo group for DeepSpeed engines in this process.

    DeepSpeed caches its process groups, so the group is created once and kept for the session. The
    launcher variables it needs are removed again after this module: left in ``os.environ`` they reach
    every later subprocess (an ``sbatch`` job would take them for a torchrun launch).
    """
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        # Set for every module that uses the fixture: DeepSpeed checks LOCAL_RANK at each engine it builds.
        first = not dist.is_initialized()
        if first:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                _PG_PORT.append(s.getsockname()[1])
        for k, v in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_PG_PORT[-1]) if _PG_PORT else "29500",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
        }.items():
            mp.setenv(k, os.environ.get(k, v))
        if first:
            from ticod.engine import init_distributed

            init_distributed("gloo", 60)
        yield


@pytest.fixture(scope="session")
def mix(demo_coco_dir: Path, demo_shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three sources: ``shapes`` (the demo shards: boxes and captions), ``boxes`` (the demo train images
    with their boxes only, two categories renamed) and ``caps`` (the demo val images, captions only)."""
    from ticod.data.coco import load_records
    from ticod.data.shards import write_shards

    root = tmp_path_factory.mktemp("mix")
    ann = demo_coco_dir / "annotations"
    inst = json.loads((ann / "instances_train.json").read_text())
    for c in inst["categories"]:
        c["name"] = {"circle": "round", "square": "box"}.get(c["name"], c["name"])
    (root / "instances_renamed.json").write_text(json.dumps(inst))
    records, cats = load_records(root / "instances_renamed.json", None)
    write_shards(
        records, cats, demo_coco_dir / "train", root / "boxes", "train", samples_per_shard=6, progress=False
    )
    records, cats = load_records(None, ann / "captions_val.json")
    write_shards(
        records, cats, demo_coco_dir / "val", root / "caps", "train", samples_per_shard=3, progress=False
    )
    (root / "map.yaml").write_text("boxes:\n  round: circle\n  box: square\n")
    sources = (
        f"data.sources=[{{name: shapes, shards_dir: {demo_shards_dir}, weight: 2}}, "
        f"{{name: boxes, shards_dir: {root / 'boxes'}, weight: 1}}, "
        f"{{name: caps, shards_dir: {root / 'caps'}, weight: 1}}]"
    )
    return {"root": root, "sources": sources, "map": root / "map.yaml", "tok": demo_shards_dir / "tokenizer"}
