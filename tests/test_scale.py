"""Many ranks: the demo model trained and evaluated by 8 CPU ranks (gloo), as a 16-64 GPU job runs it."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from helpers import ok, run_train, train_log

from ticod.data.shards import read_manifest


@pytest.mark.slow
def test_eight_ranks_zero3_train_then_evaluate_uneven_shares(demo_shards_dir, tmp_path):
    """8 ranks, ZeRO-3, 2 steps, then the final evaluation on ``eval.max_images=5`` of the 8 val images, with
    the middle val shard (images 3-5) unreadable. The 8 eval streams each own one of the first 8 images:
    ranks 0-2 get one readable image, ranks 3-4 one unreadable image, ranks 5-7 none. Every rank runs the
    model in lockstep all the same (ZeRO-3 gathers weights at every forward), and each image is counted once.
    """
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards_dir, shards)
    (shards / "val-000001.tar").write_bytes(b"not a tar archive" * 64)
    run = tmp_path / "run"
    proc = run_train(
        [
            f"run_dir={run}",
            f"data.shards_dir={shards}",
            "data.num_workers=0",
            "max_steps=2",
            "deepspeed.zero_stage=3",
            "eval.at_end=true",
            "eval.max_images=5",
            "eval.num_sample_images=0",
            "model.captioner.max_new_tokens=4",
        ],
        nproc=8,
        timeout=1500,  # 8 ranks share the test machine's cores
    )
    ok(proc)
    rows = train_log(run)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in rows)
    eval_dir = run / "eval" / "step_00000002"
    assert (eval_dir / "metrics.json").is_file(), proc.stderr[
        -6000:
    ]  # a failed evaluation does not stop training
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 8
    assert metrics["num_images"] == 3 and metrics["bad_samples"] == 2  # images 3 and 4, once each
    first = [int(k) for s in read_manifest(str(shards), "val")["shards"] for k in s["keys"]][:3]
    assert [c["image_id"] for c in json.loads((eval_dir / "captions.json").read_text())] == sorted(first)
