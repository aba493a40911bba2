"""Quality guard: short demo trainings must learn what each branch is for, or CI fails.

The machinery tests (exact resume, collectives, faults) cannot see a model that trains without error but
learns less: the quickstart's captioner once fell back on a few sentences for every image (issue 24) while
every test passed. Here the demo model trains for a short budget on the demo data (600 rendered train
images: the quickstart's set before it grew to 1800, the one the floors and the regressed code's failure
were measured on; 2 CPU ranks under the deepspeed launcher, as ``launch/quickstart.sh``) and its val
metrics must clear floors:

* joint: box AP, CIDEr, BERTScore-F1 (offline all-MiniLM-L6-v2), the number of distinct captions, the
  grounding gap (``ticod/metrics/grounding.py``: how much the caption loss depends on the right image) and
  the shape accuracy (:func:`shape_accuracy`: whether the captions name the shapes the image has, which
  the decoder learns from the detector's objects, ``model.captioner.object_tokens``);
* detection only and caption only: the same floors for their branch, so a change that hurts one branch
  says which one.

The floors sit below the fixed code's numbers by a margin documented at :data:`FLOORS` (float rounding
differs between CPU models; the margin was chosen from the spread over seeds, which is larger). The
regressed code of issue 24 (7090abb's demo config: λ 0.2, backbone lr 2e-4, one caption per image, no
object tokens) fails the joint case on CIDEr, BERTScore-F1, distinct captions (9 against 61-67 fixed), the
grounding gap (0.020 against 0.42-0.43) and the shape accuracy (0.28 against 0.62-0.72): a captioner that
does not read the image.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import DEMO, deepspeed_cmd, load_tool, minilm_dir, run_killing_group, shard_demo_coco, train_env

from ticod.metrics.grounding import grounding_of_run

# Beside the serial tests (pytest-xdist): deterministic trainings with a 900 s timeout, whose result does not
# depend on how fast they run; in the serial group they made its chain, and CI, 3 min longer.
pytestmark = [pytest.mark.slow, pytest.mark.parallel_ok]

STEPS = 300
GUARD = [f"max_steps={STEPS}", "checkpoint.save_every=0", "eval.at_end=true", "logging.log_every=50"]
# Floors: the fixed code's 300-step numbers (configs/demo.yaml: 5 captions per image, λ 2, 10 object tokens,
# 4 beams at length penalty 0.5; AMD EPYC, 2 cores, seeds 0 and 1) less a margin of at least a seed's spread
# (CIDEr 0.31 between two seeds before the objects' classes and thumbnails; another CPU model's rounding
# perturbs a run like another seed). Measured 2026-12-07, seed 0 / seed 1 / regressed (7090abb's config on
# today's code, without object tokens), in docs/quality.md:
#   joint: AP 0.584 / 0.570 / 0.652, CIDEr 2.356 / 2.450 / 0.660, BERTScore-F1 0.751 / 0.795 / 0.624,
#          distinct 59 / 63 / 5, grounding gap 0.430 / 0.419 / 0.020, shape accuracy 0.69 / 0.64 / 0.27
#          (without object tokens 0.22 / 0.24: the floor that says the decoder reads the detector's objects).
#   detection only: AP 0.554.   caption only: CIDEr 0.987 / 0.944, BERTScore-F1 0.643 / 0.672,
#          distinct 35 / 45, grounding gap 0.173 / 0.197.
FLOORS: dict[str, dict[str, float]] = {
    "joint": {
        "AP": 0.4,
        "CIDEr": 1.5,
        "BERTScore-F1": 0.66,
        "distinct_captions": 25,
        "grounding_gap": 0.2,
        "shape_accuracy": 0.45,
    },
    "detection": {"AP": 0.40},
    "caption": {"CIDEr": 0.60, "BERTScore-F1": 0.60, "distinct_captions": 12, "grounding_gap": 0.07},
}


def shape_accuracy(captions: list[dict[str, Any]], instances: dict[str, Any]) -> float:
    """Of the captions that name a shape, the share naming only shapes their image has (the demo's
    categories, singular or plural): about 0.2 for a decoder that guesses the shape (1 in 6), 0.6-0.7 for
    the demo's after 300 steps, which reads the detector's objects."""
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present: dict[int, set[str]] = collections.defaultdict(set)
    for a in instances["annotations"]:
        if not a["iscrowd"]:
            present[a["image_id"]].add(names[a["category_id"]])
    named = right = 0
    for c in captions:
        words = set(re.findall(r"[a-z]+", c["caption"].lower()))
        shapes = {n for n in names.values() if words & {n, n + "s", n + "es"}}
        if shapes:
            named += 1
            right += shapes <= present[c["image_id"]]
    return right / named if named else 0.0


def test_shape_accuracy_counts_the_captions_naming_only_shapes_their_image_has():
    instances = {
        "categories": [{"id": 1, "name": "circle"}, {"id": 13, "name": "cross"}, {"id": 8, "name": "star"}],
        "annotations": [
            {"image_id": 5, "category_id": 1, "iscrowd": 0},
            {"image_id": 5, "category_id": 13, "iscrowd": 0},
            {"image_id": 6, "category_id": 8, "iscrowd": 1},  # a crowd of stars is not a star
        ],
    }
    captions = [
        {"image_id": 5, "caption": "two red crosses and a circle"},  # right (plural "crosses")
        {"image_id": 5, "caption": "a star and a circle"},  # wrong: no star
        {"image_id": 6, "caption": "a yellow star"},  # wrong
        {"image_id": 6, "caption": "a picture with no shapes"},  # names none: not counted
    ]
    assert shape_accuracy(captions, instances) == pytest.approx(1 / 3)
    assert shape_accuracy(captions[3:], instances) == 0.0


@pytest.fixture(scope="module")
def quickstart_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data at 600 train + 100 val images (seed 0), shards and a 1000-token BPE, as the quickstart's."""
    root = tmp_path_factory.mktemp("quality")
    load_tool("make_demo_coco").make_demo_coco(root / "coco", 600, 100, 0)
    return shard_demo_coco(root / "coco", root / "shards", {"train": 100, "val": 25}, 1000)


def train_and_score(shards: Path, run_dir: Path, task: str) -> dict[str, float]:
    cmd = [*deepspeed_cmd("ticod.train"), "--config", str(DEMO), f"run_dir={run_dir}", f"data.shards_dir={shards}",
           f"loss.task={task}", "eval.bertscore=true", f"eval.bertscore_model={minilm_dir()}",
           "eval.bertscore_num_layers=6", *GUARD]  # fmt: skip
    proc = run_killing_group(cmd, env=train_env(), timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    (metrics_path,) = sorted((run_dir / "eval").glob("step_*/metrics.json"))[-1:]
    metrics = json.loads(metrics_path.read_text())
    if task != "detection":
        written = json.loads((metrics_path.parent / "captions.json").read_text())
        captions = [c["caption"] for c in written]
        metrics["top_captions"] = collections.Counter(captions).most_common(3)
        instances = json.loads((shards.parent / "coco" / "annotations" / "instances_val.json").read_text())
        metrics["shape_accuracy"] = shape_accuracy(written, instances)
        metrics.update(grounding_of_run(run_dir, shards))
    return metrics


@pytest.mark.parametrize("task", ["joint", "detection", "caption"])
def test_demo_training_clears_quality_floors(quickstart_shards, tmp_path, task):
    metrics = train_and_score(quickstart_shards, tmp_path / task, task)
    low = {k: (metrics[k], floor) for k, floor in FLOORS[task].items() if metrics[k] < floor}
    assert not low, (
        f"{task}: below the floor (value, floor): {low}; most common captions: {metrics.get('top_captions')}"
    )
