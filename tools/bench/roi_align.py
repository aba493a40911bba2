"""RoIAlign on CPU: torchvision's ``roi_align(aligned=True)`` kernel vs ticod.models.roi_align, alone and in a step.

``python tools/bench/roi_align.py [--config configs/demo.yaml] [--batch-size 4] [--threads 1]``

Two tables. The pooler alone: forward + backward of one cascade stage's worth of RoIs (random boxes, as
many per image as a stage samples) on the FPN maps of the first batch. A training step: forward, backward
and AdamW of the whole model on the same fixed batches, once with torchvision's pooler swapped in and once
with TICOD's. Both poolers compute the same values (tests/test_roi_align.py); the table says what the
CPU path saves. On a GPU both sides run torchvision's kernel, so there is nothing to measure there.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from common import (
    Report,
    Row,
    add_common_args,
    alternate,
    bench_config,
    fixed_batches,
    make_demo_data,
    setup,
    timed,
    workdir,
)

from ticod.factory import build_model, build_tokenizer
from ticod.models.backbone import pad_to_multiple
from ticod.models.roi_align import MultiScaleRoIAlign, roi_align_per_level


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/roi_align.json")
    p.add_argument("--steps", type=int, default=3, help="training steps per side per round")
    p.add_argument("--images", type=int, default=32, help="demo images to generate (without --data)")
    return p.parse_args(argv)


class TorchvisionKernelPooler(MultiScaleRoIAlign):
    """TICOD's pooler with torchvision's ``roi_align(aligned=True)`` kernel on every device."""

    def kernel(self, device: torch.device) -> Callable[..., torch.Tensor]:
        return roi_align_per_level


def torchvision_pooler(pool: MultiScaleRoIAlign) -> TorchvisionKernelPooler:
    ref = TorchvisionKernelPooler(pool.featmap_names, pool.output_size, pool.sampling_ratio)
    ref.canonical_scale, ref.canonical_level = pool.canonical_scale, pool.canonical_level
    return ref


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    if device.type != "cpu":
        print("both sides use torchvision's kernel off the CPU; run this on a CPU")
        return 2
    report = Report("roi_align", device, vars(args))
    with workdir() as tmp:
        shards = args.data or make_demo_data(tmp, args.images)[1]
        cfg = bench_config(args, shards, "loss.task=joint")
        tok = build_tokenizer(cfg.data)
        batches = [b.to(device, non_blocking=False) for b in fixed_batches(cfg, tok, args.steps, args.seed)]
    torch.manual_seed(args.seed)
    ours = build_model(cfg, tok).to(device).train()
    theirs = copy.deepcopy(ours)
    heads = theirs.detector.roi_heads
    heads.box_roi_pool = torchvision_pooler(heads.box_roi_pool)
    pool_ours = ours.detector.roi_heads.box_roi_pool
    pool_theirs = torchvision_pooler(pool_ours)

    # One stage's RoIs on the FPN maps of the first batch: the proposals the RPN keeps, as in training.
    b = batches[0]
    with torch.no_grad():
        padded = pad_to_multiple(ours.normalize(b.images, b.image_sizes), ours.backbone.size_divisor)
        fpn = ours.detector.fpn(ours.backbone(padded))
    sizes = b.image_sizes
    g = torch.Generator().manual_seed(args.seed)
    boxes = []
    for h, w in sizes:
        scale = torch.tensor([w, h], dtype=torch.float32)
        xy = torch.rand(cfg.model.roi.batch_size_per_image, 2, generator=g) * 0.8 * scale
        wh = torch.rand(cfg.model.roi.batch_size_per_image, 2, generator=g) * 0.5 * scale + 4
        boxes.append(torch.cat([xy, torch.minimum(xy + wh, scale)], 1))
    maps = {k: v.detach().requires_grad_(True) for k, v in fpn.items()}
    n_rois = sum(len(x) for x in boxes)

    def pool_side(pool: Any) -> Any:
        def run() -> float:
            def fwd_bwd() -> None:
                out = pool(maps, boxes, sizes)
                torch.autograd.grad(out.sum(), list(maps.values()), allow_unused=True)

            return timed(fwd_bwd, device) * 1e3

        return run

    print(f"pooler: {n_rois} RoIs, {len(fpn)} FPN maps of {next(iter(fpn.values())).shape[1]} channels")
    v = alternate(
        {"theirs": pool_side(pool_theirs), "ours": pool_side(pool_ours)},
        repeats=args.repeats,
        warmup=args.warmup,
    )
    report.table(
        f"RoIAlign forward + backward, {n_rois} RoIs",
        [
            Row("ticod.models.roi_align", v["ours"], "ms", "torchvision"),
            Row("torchvision", v["theirs"], "ms"),
        ],
    )

    def step_side(model: torch.nn.Module) -> Any:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def steps() -> None:
            for batch in batches:
                loss = model(batch.images, batch.targets, batch.captions, batch.image_sizes)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return lambda: timed(steps, device) / len(batches)

    print(f"training step: batch {cfg.data.batch_size}, {cfg.model.roi.batch_size_per_image} RoIs per image")
    v = alternate(
        {"theirs": step_side(theirs), "ours": step_side(ours)}, repeats=args.repeats, warmup=args.warmup
    )
    report.table(
        f"Training step (demo model, batch {cfg.data.batch_size})",
        [
            Row("with ticod.models.roi_align", v["ours"], "s/step", "with torchvision"),
            Row("with torchvision", v["theirs"], "s/step"),
        ],
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
