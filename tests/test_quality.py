"""Quality guard: short demo trainings must learn what each branch is for, or CI fails.

The machinery tests (exact resume, collectives, faults) cannot see a model that trains without error but
learns less: the quickstart's captioner once fell back on a few sentences for every image (issue 24) while
every test passed. Here the demo model trains for a short budget on the demo data (600 rendered train
images: the quickstart's set before it grew to 1800, the one the floors and the regressed code's failure
were measured on; 2 CPU ranks under the deepspeed launcher, as ``launch/quickstart.sh``) and its val
metrics must clear floors:

* joint: box AP, CIDEr, BERTScore-F1 (offline all-MiniLM-L6-v2), the number of distinct captions and the
  grounding gap (``ticod/metrics/grounding.py``: how much the caption loss depends on the right image);
* detection only and caption only: the same floors for their branch, so a change that hurts one branch
  says which one.

The floors sit below the fixed code's numbers by a margin documented at :data:`FLOORS` (float rounding
differs between CPU models; the margin was chosen from the spread over seeds, which is larger). The
regressed code of issue 24 (7090abb's demo config: λ 0.2, backbone lr 2e-4, one caption per image) fails
the joint case on distinct captions (4 against 32-48 fixed) and the grounding gap (0.020 against
0.14-0.17): a captioner that does not read the image.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from helpers import DEMO, deepspeed_cmd, load_tool, minilm_dir, run_killing_group, shard_demo_coco, train_env

from ticod.metrics.grounding import grounding_of_run

# Beside the serial tests (pytest-xdist): deterministic trainings with a 900 s timeout, whose result does not
# depend on how fast they run; in the serial group they made its chain, and CI, 3 min longer.
pytestmark = [pytest.mark.slow, pytest.mark.parallel_ok]

STEPS = 300
GUARD = [f"max_steps={STEPS}", "checkpoint.save_every=0", "eval.at_end=true", "logging.log_every=50"]
# Floors: the fixed code's 300-step numbers (configs/demo.yaml: 5 captions per image, λ 2; AMD EPYC, 2
# cores, seeds 0 and 1) less a margin of at least a seed's spread (CIDEr 0.23 over 3 seeds at 600 steps;
# another CPU model's rounding perturbs a run like another seed). Measured, seed 0 / seed 1 / regressed
# (7090abb's config on today's code), in docs/quality.md:
#   joint: AP 0.559 / 0.554 / 0.652, CIDEr 0.806 / 0.798 / 0.645, BERTScore-F1 0.629 / 0.637 / 0.626,
#          distinct 32 / 48 / 4, grounding gap 0.138 / 0.167 / 0.020 (the regressed code fails distinct and gap).
#   detection only: AP 0.554.   caption only: CIDEr 0.863 / 0.799, BERTScore-F1 0.640 / 0.623,
#          distinct 27 / 55, grounding gap 0.173 / 0.197.
FLOORS: dict[str, dict[str, float]] = {
    "joint": {"AP": 0.4, "CIDEr": 0.6, "BERTScore-F1": 0.6, "distinct_captions": 12, "grounding_gap": 0.06},
    "detection": {"AP": 0.40},
    "caption": {"CIDEr": 0.60, "BERTScore-F1": 0.60, "distinct_captions": 12, "grounding_gap": 0.07},
}


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
        captions = [c["caption"] for c in json.loads((metrics_path.parent / "captions.json").read_text())]
        metrics["top_captions"] = collections.Counter(captions).most_common(3)
        metrics.update(grounding_of_run(run_dir, shards))
    return metrics


@pytest.mark.parametrize("task", ["joint", "detection", "caption"])
def test_demo_training_clears_quality_floors(quickstart_shards, tmp_path, task):
    metrics = train_and_score(quickstart_shards, tmp_path / task, task)
    low = {k: (metrics[k], floor) for k, floor in FLOORS[task].items() if metrics[k] < floor}
    assert not low, (
        f"{task}: below the floor (value, floor): {low}; most common captions: {metrics.get('top_captions')}"
    )
