"""A rank that fails in ZeRO-3 lockstep evaluation (issue 25, defect 4): every rank stops and raises the
failure in seconds (the trainer counts it as eval/failed), none waits for the distributed timeout.

Two gloo ranks on CPU with a ZeRO-3 engine of the tiny model: each has two batches, and rank 1
fails at its second one, either in its loader or on a batch it cannot use (before its model forward, so
it must make a stand-in forward for rank 0's)."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from tiny_model import (
    CATEGORY_IDS,
    CATEGORY_NAMES,
    MEAN,
    STD,
    build_eval_model,
    eval_config,
    make_batches,
    predict_batches,
    save_ground_truth,
    word_tokenizer,
)

from ticod.data.samples import Batch
from ticod.evaluate import evaluate
from ticod.ground_truth import GroundTruth

TIMEOUT_S = 60  # the process group's: a rank left waiting in a collective fails after this


def failing_batches(batches: list[Batch], how: str) -> Iterator[Batch]:
    """Rank 1's stream: its first batch, then a loader error or a batch without its image sizes."""
    yield batches[0]
    if how == "loader":
        raise OSError("fault injection: rank 1's loader cannot read its next shard")
    broken = copy.copy(batches[1])
    del broken.image_sizes  # reading it fails in the prediction step, before the model's forward
    yield broken


def _rank_main(rank: int, port: int, out_dir: str, gt_file: str, how: str) -> None:
    from ticod import engine as engine_lib

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    engine_lib.init_distributed("gloo", timeout_s=TIMEOUT_S)
    t0 = time.monotonic()
    try:
        cfg = eval_config("deepspeed.zero_stage=3", "deepspeed.precision=fp32", "eval.bertscore=false")
        engine = engine_lib.build_engine(build_eval_model(cfg), cfg, world_size=2)
        engine.eval()
        batches = make_batches()
        t0 = time.monotonic()
        try:
            evaluate(
                engine.module,
                batches[:2] if rank == 0 else failing_batches(batches[2:], how),
                gt=GroundTruth(**torch.load(gt_file, weights_only=False)),
                category_ids=CATEGORY_IDS,
                category_names=CATEGORY_NAMES,
                tokenizer=word_tokenizer(),
                cfg=cfg.eval,
                rank=rank,
                world_size=2,
                out_dir=out_dir,
                device=torch.device("cpu"),
                image_mean=MEAN,
                image_std=STD,
                synced=True,
            )
            outcome = "returned"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        # Both ranks can still meet in a collective: the process group is alive.
        alive = torch.ones(1)
        dist.all_reduce(alive)
        result = {"outcome": outcome, "seconds": time.monotonic() - t0, "alive": alive.item()}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["loader", "batch"])
def test_a_rank_failing_in_lockstep_evaluation_fails_every_rank_at_once(tmp_path, how):
    torch.set_num_threads(1)
    records = predict_batches(build_eval_model(eval_config()), make_batches())
    gt_file = save_ground_truth([r for recs in records for r in recs], tmp_path)
    mp.spawn(_rank_main, args=(int(free_port()), str(tmp_path), gt_file, how), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    cause = (
        "OSError: fault injection"
        if how == "loader"
        else "AttributeError: 'Batch' object has no attribute 'image_sizes'"
    )
    for rank, result in enumerate(results):
        assert (
            result["outcome"].startswith("RuntimeError: ")
            and "prediction failed on rank 1: " + cause in (result["outcome"])
        ), (rank, result)
        assert result["seconds"] < TIMEOUT_S / 2 and result["alive"] == 2.0, (rank, result)
