"""Partially labelled batches under DeepSpeed ZeRO-2 on 2 CPU ranks (gloo): one rank sees captions only.

Rank 0's detector then trains on nothing. It must still run and back-propagate (zero) gradients into every
weight, or ZeRO's per-weight gradient reduction would wait for it forever (or pair the ranks' buckets
wrongly). The steps go through ``ticod.train.forward_backward``, as in training, with the real engine.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_model import BOS, EOS, VOCAB, batch, partially_labelled, tiny_config

from ticod.checkpoint import Checkpointer
from ticod.data.samples import Batch
from ticod.models import TICOD

STEPS = 3
TIMEOUT_S = 300  # the whole test; a collective left waiting fails after COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_batch(rank: int) -> Batch:
    """Rank 0: captions only (empty targets); rank 1: boxes and captions."""
    if rank == 0:
        return partially_labelled(batch(with_boxes=False), [False, False], [True, True])
    return replace(batch(), has_boxes=[True, True], has_caption=[True, True])


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    from ticod import engine as engine_lib
    from ticod.resume import TrainState
    from ticod.train import forward_backward

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    engine_lib.init_distributed("gloo", timeout_s=COLLECTIVE_TIMEOUT_S)  # a hang fails, not blocks
    try:
        cfg = tiny_config("deepspeed.zero_stage=2", "deepspeed.precision=fp32", "data.batch_size=2")
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = TICOD(cfg.model, cfg.loss, VOCAB, BOS, EOS, EOS)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        engine = engine_lib.build_engine(model, cfg, world_size=2)
        engine.train()
        saver = Checkpointer(Path(out_dir) / f"run{rank}", keep_last=1)
        run = SimpleNamespace(cfg=cfg, engine=engine, state=TrainState(), checkpointer=saver)
        losses = []
        for step in range(STEPS):
            torch.manual_seed(100 * step + rank)
            out, _, _ = forward_backward(run, rank_batch(rank), log_now=False, stop_requested=False)
            assert out is not None, f"rank {rank} step {step}: non-finite loss"
            losses.append({k: v.item() for k, v in out.items()})
        # ZeRO-2 partitions optimizer states and gradients only: every rank holds all the weights.
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        torch.save(
            {"losses": losses, "weights": weights, "initial": initial}, Path(out_dir) / f"rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero2_ranks_with_captions_only_and_fully_labelled_batches_stay_in_step(tmp_path):
    context = mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # raises when a rank raised
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"the ranks did not finish {STEPS} steps in {TIMEOUT_S} s (hang)")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank, res in enumerate(results):
        assert len(res["losses"]) == STEPS
        assert all(math.isfinite(v) for step in res["losses"] for v in step.values()), rank
    assert all(step["loss_det"] == 0.0 and step["loss_cap"] > 0 for step in results[0]["losses"])
    assert all(step["loss_det"] > 0 and step["loss_cap"] > 0 for step in results[1]["losses"])
    weights0, weights1 = results[0]["weights"], results[1]["weights"]
    assert weights0.keys() == weights1.keys() and weights0
    different = [n for n in weights0 if not torch.equal(weights0[n], weights1[n])]
    assert not different, f"the ranks' weights differ: {different[:5]}"
    # Rank 1's boxes reached the detector through the averaged gradients: its weights moved.
    moved = [n for n in weights0 if not torch.equal(weights0[n], results[0]["initial"][n])]
    assert any(n.startswith("detector.roi_heads.") for n in moved)
    assert any(n.startswith("captioner.") for n in moved)
