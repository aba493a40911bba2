"""Every labelled image (detection losses) and every caption token (caption loss) of an optimizer step weighs
the same, whichever rank and micro-batch it landed in (issue 25, defect 6).

Before, each micro-batch's losses were means over its own labelled images / tokens and DeepSpeed averaged
the micro-batches: a box image weighed 1 / (k · W · G) (k box images in its micro-batch, W ranks, G
accumulation steps), a micro-batch without box images added 0 but still counted in the average, and a
caption token weighed 1 / (tokens of its micro-batch · W · G). Now the trainer sums each step's label units
over ranks and micro-batches (with the first micro-batch's flag all-reduce) and rescales each micro-batch's
task losses (:func:`ticod.train.step_loss`).

Images are all 64 x 64 (no padding differences) and every anchor and RoI is sampled (sampling sizes above
their numbers), so an image's losses do not depend on its batch: the gradient of 2 ranks x 2 micro-batches
equals that of one process on all 8 images as one batch.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_model import BOS, EOS, VOCAB, batch_losses, tiny_config

from ticod.checkpoint import Checkpointer
from ticod.data.samples import Batch
from ticod.models import TICOD
from ticod.models.ticod import label_units
from ticod.resume import TrainState
from ticod.train import StepUnits, batch_units, forward_backward, step_loss

SIZE = 64
# Every anchor and RoI sampled: an image's losses do not depend on the random sampler or on its batch.
# lr 1e-30: the optimizer steps of the rank processes leave the weights as they were (below one ulp).
CONFIG = (
    "model.rpn.batch_size_per_image=100000",
    "model.roi.batch_size_per_image=100000",
    "loss.caption_weight=0.5",
    "deepspeed.zero_stage=0",
    "deepspeed.precision=fp32",
    "data.batch_size=2",
    "optim.grad_accum=2",
    "optim.lr=1e-30",
    "optim.backbone_lr=1e-30",
    "optim.grad_clip=0",
)
# Per image: boxes (xyxy) and labels, or None where it is not labelled for boxes; caption tokens, or None.
IMAGES = [
    ([[4, 6, 40, 50], [30, 20, 60, 62]], [1, 3], [5, 6, 7, 8]),
    (None, None, [9, 10]),  # captions only
    (None, None, [11, 12, 13, 14, 15, 16]),  # captions only
    (None, None, [17]),  # captions only
    ([[10, 10, 50, 40]], [2], None),  # boxes only
    ([[2, 2, 30, 30], [20, 24, 62, 60], [8, 30, 28, 58]], [1, 2, 4], [18, 19, 20, 21, 22]),
    ([[16, 8, 56, 48]], [4], [23, 24]),
    ([], [], [25, 26, 27]),  # labelled for boxes, none present (a background image)
]
# Micro-batches (image indices) per rank: rank 0's second micro-batch has no box image at all.
RANKS = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
TOL = 1e-5  # relative to the largest gradient entry
TIMEOUT_S = 300
COLLECTIVE_TIMEOUT_S = 120


def make_batch(indices: list[int]) -> Batch:
    """The images ``indices`` of IMAGES collated as the data pipeline does (partial labels included)."""
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(len(IMAGES), 3, SIZE, SIZE, generator=g)
    specs = [IMAGES[i] for i in indices]
    length = 2 + max(len(c or []) for _, _, c in specs)
    ids = torch.full((len(indices), length), EOS)
    mask = torch.zeros((len(indices), length), dtype=torch.int64)
    targets = []
    for row, (boxes, labels, caption) in enumerate(specs):
        tokens = [BOS, *(caption or []), EOS]  # no caption: the tokenised "" (BOS EOS), as the pipeline
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        targets.append(
            {
                "boxes": torch.tensor(boxes or [], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels or [], dtype=torch.int64),
            }
        )
    return Batch(
        images=pixels[indices],
        image_sizes=[(SIZE, SIZE)] * len(indices),
        targets=targets,
        captions={"input_ids": ids, "attention_mask": mask},
        has_boxes=[s[0] is not None for s in specs],
        has_caption=[s[2] is not None for s in specs],
    )


def build_model() -> TICOD:
    cfg = tiny_config(*CONFIG)
    torch.manual_seed(0)
    return TICOD(cfg.model, cfg.loss, VOCAB, BOS, EOS, EOS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    from ticod import engine as engine_lib

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    engine_lib.init_distributed("gloo", timeout_s=COLLECTIVE_TIMEOUT_S)
    try:
        cfg = tiny_config(*CONFIG)
        engine = engine_lib.build_engine(build_model(), cfg, world_size=2)
        engine.train()
        grads: list[dict[str, torch.Tensor]] = []
        step = engine.step

        def recording_step() -> None:  # ZeRO 0: the averaged gradients sit in .grad before the step
            if engine.is_gradient_accumulation_boundary():
                grads.append({n: p.grad.clone() for n, p in engine.module.named_parameters()})
            step()

        engine.step = recording_step
        batches = [make_batch(mb) for mb in RANKS[rank]]
        # As the training loop: the step's units of this rank, summed over ranks with the first flags.
        units = StepUnits(torch.stack([batch_units(b) for b in batches]).sum(dim=0), micro_batches=2 * 2)
        saver = Checkpointer(Path(out_dir) / f"run{rank}", keep_last=1)
        run = SimpleNamespace(cfg=cfg, engine=engine, state=TrainState(), checkpointer=saver)
        for b in batches:
            out, _, _ = forward_backward(run, b, log_now=False, stop_requested=False, units=units)
            assert out is not None
        # The weighting before the fix (the same weights: lr 1e-30): each micro-batch's mean losses.
        for b in batches:
            engine.backward(batch_losses(engine, b)["loss"])
            engine.step()
        torch.save({"grads": grads, "total": units.total}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def max_deviation(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in want.values())
    return max(float((got[n] - want[n]).abs().max()) for n in want) / scale


@pytest.mark.slow
def test_two_ranks_two_micro_batches_give_the_gradient_of_one_process_over_the_same_images(tmp_path):
    context = mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"the ranks did not finish in {TIMEOUT_S} s (hang)")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # 5 images labelled for boxes; caption targets: tokens + EOS of the 7 captioned images.
    captioned = [c for _, _, c in IMAGES if c is not None]
    assert results[0]["total"] == results[1]["total"] == [5.0, float(sum(len(c) + 1 for c in captioned))]

    model = build_model().train()
    batch_losses(model, make_batch(list(range(len(IMAGES)))))["loss"].backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    new, old = (results[0]["grads"][i] for i in (0, 1))
    assert max_deviation(results[1]["grads"][0], new) == 0.0  # the ranks agree (all-reduced)
    deviation, before = max_deviation(new, reference), max_deviation(old, reference)
    print(
        f"max |grad - one process| / max |grad|: per-step units {deviation:.2e}, per micro-batch {before:.2e}"
    )
    assert deviation < TOL
    assert before > 100 * TOL  # the old weighting is far off: the comparison can tell


@torch.no_grad()
def test_each_labelled_image_and_caption_token_weighs_the_same_in_a_mixed_step():
    """One rank, 2 micro-batches: [A, C] and [B, D]; C has a caption only, A, B, D boxes and captions."""
    model = build_model().train()
    a, c, b, d = 0, 1, 5, 6
    steps = [[a, c], [b, d]]
    single = {i: batch_losses(model, make_batch([i])) for i in (a, b, d, c)}
    det = {i: float(single[i]["loss_det"]) for i in (a, b, d)}
    tokens = {i: float(batch_units(make_batch([i]))[1]) for i in (a, c, b, d)}
    cap_sum = {i: float(single[i]["loss_cap"]) * tokens[i] for i in (a, c, b, d)}
    with_c = float(batch_losses(model, make_batch([a, c]))["loss_det"])
    print(f"loss_det of [A]: {det[a]:.6f}, of [A, C (captions only)]: {with_c:.6f}")
    assert with_c == pytest.approx(det[a], rel=1e-6)  # C adds no detection loss and does not dilute A's

    batches = [make_batch(mb) for mb in steps]
    here = [batch_units(bt) for bt in batches]
    units = StepUnits(total=torch.stack(here).sum(dim=0).tolist(), micro_batches=len(steps))
    det_new = det_old = cap_new = cap_old = 0.0
    for bt, units_here in zip(batches, here, strict=True):
        out = batch_losses(model, bt)
        # DeepSpeed's mean over the step's micro-batches, of the normalised (new) and plain (old) losses.
        det_new += float(step_loss({"loss": out["term_det"], "term_det": out["term_det"]}, units_here, units))
        cap_new += float(step_loss({"loss": out["loss_cap"], "term_cap": out["loss_cap"]}, units_here, units))
        det_old, cap_old = det_old + float(out["loss_det"]), cap_old + float(out["loss_cap"])
    det_new, det_old, cap_new, cap_old = (x / len(steps) for x in (det_new, det_old, cap_new, cap_old))

    # Per image weights in the step's detection loss, and per token weights in its caption loss.
    box_images, step_tokens = 3, sum(tokens.values())
    weights_old = {a: 1 / 2, c: 0.0, b: 1 / 4, d: 1 / 4}  # 1 / (k · G), k = box images of the micro-batch
    weights_new = {a: 1 / box_images, c: 0.0, b: 1 / box_images, d: 1 / box_images}
    token_old = {i: 1 / (2 * sum(tokens[j] for j in mb)) for mb in steps for i in mb}
    names = {a: "A", c: "C", b: "B", d: "D"}
    print("image  det weight before  after   caption-token weight before  after")
    for i in (a, c, b, d):
        print(
            f"{names[i]:>5}  {weights_old[i]:17.4f}  {weights_new[i]:.4f}  {token_old[i]:27.4f}  {1 / step_tokens:.4f}"
        )
    assert det_old == pytest.approx(sum(weights_old[i] * det[i] for i in det), rel=1e-5)
    assert det_new == pytest.approx(sum(det.values()) / box_images, rel=1e-5)
    assert cap_old == pytest.approx(sum(token_old[i] * cap_sum[i] for i in cap_sum), rel=1e-5)
    assert cap_new == pytest.approx(sum(cap_sum.values()) / step_tokens, rel=1e-5)
    assert abs(det_new - det_old) > 1e-3 * det_new  # the batch is mixed enough for the weights to matter


def test_caption_tokens_of_k_captions_per_image_count_every_row_of_a_captioned_image():
    # Two images, two captions each (rows image by image): 4 + 2 tokens for image 0, 3 + 1 for image 1.
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert label_units(2, mask).tolist() == [2.0, 10.0]
    assert label_units(2, mask, has_boxes=[True, False], has_caption=[True, False]).tolist() == [1.0, 6.0]
    assert label_units(2, mask, has_caption=[False, True]).tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="4 caption rows for 3 images"):
        label_units(3, mask)
