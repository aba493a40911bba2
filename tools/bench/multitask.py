"""Multitask efficiency: the joint TICOD model vs. a detection-only plus a caption-only model.

``python tools/bench/multitask.py [--config configs/demo.yaml] [--device cuda --precision bf16
--image-size 1333x800 --config configs/ticod_large.yaml]``

The two separate models (``loss.task=detection`` and ``loss.task=caption``) each have their own backbone
and start from the joint model's weights, so all three do exactly the same work apart from the shared
backbone (checked: their losses and predictions equal the joint model's). Measured, alternating:

* training step (forward + backward + grad clip + AdamW) of each model on the same batches;
* the backbone alone (forward + backward with fixed upstream gradients + clip + AdamW): the work that
  sharing saves. ``f_bb`` = backbone step / (det step + caption step), one backbone's share of the two
  separate models' time; sharing can save at most that fraction, and the issue's target asks for 80% of
  it: joint ≤ (1 − 0.8·f_bb) × (det + caption);
* inference (boxes + caption) of the joint model vs. the two models one after the other;
* peak tensor memory of training (weights + gradients + AdamW state + activations, built and run for two
  steps inside the measurement) and of inference: joint vs. the two added (target ≤ 0.85×).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from common import (
    Report,
    Row,
    Target,
    add_common_args,
    autocast,
    bench_config,
    fixed_batches,
    make_demo_data,
    mib,
    model_vocab,
    peak_memory,
    setup,
    timed,
    workdir,
)
from common import alternate as run_alternating
from torch import nn

from ticod.config import Config
from ticod.data.samples import Batch
from ticod.data.tokenizer import load_tokenizer
from ticod.models import TICOD
from ticod.models.backbone import pad_to_multiple
from ticod.optim import build_optimizer

TASKS = ("joint", "detection", "caption")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/multitask.json")
    p.add_argument("--steps", type=int, default=3, help="distinct batches (each round uses the next one)")
    p.set_defaults(repeats=15)
    p.add_argument("--images", type=int, default=48, help="demo images to generate (without --data)")
    return p.parse_args(argv)


class Side:
    """One model (joint, detection-only or caption-only) with its optimizer and batch cycle."""

    def __init__(
        self, task: str, cfg: Config, weights: dict[str, torch.Tensor], tok: Any, device: torch.device
    ) -> None:
        self.task, self.cfg, self.device = task, cfg, device
        self.model = build(cfg, tok, weights).to(device)
        self.opt = build_optimizer(self.model, cfg.optim, fused=device.type == "cuda")

    def losses(self, b: Batch) -> dict[str, torch.Tensor]:
        with autocast(self.cfg, self.device):
            return self.model(
                b.images,
                targets=b.targets if self.task != "caption" else None,
                captions=b.captions if self.task != "detection" else None,
                image_sizes=b.image_sizes,
            )

    def train_step(self, b: Batch) -> None:
        self.model.train()
        self.losses(b)["loss"].backward()
        clip_and_step(self.model, self.opt, self.cfg.optim.grad_clip)

    @torch.no_grad()
    def predict(self, b: Batch) -> list[dict[str, Any]]:
        self.model.eval()
        with autocast(self.cfg, self.device):
            return self.model(b.images, image_sizes=b.image_sizes)


def build(cfg: Config, tok: Any, weights: dict[str, torch.Tensor]) -> TICOD:
    model = TICOD(
        cfg.model, cfg.loss, model_vocab(cfg, tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )
    own = model.state_dict()
    # Everything the joint model has in the same shape (all of it unless captions read FPN levels).
    model.load_state_dict(
        {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}, strict=False
    )
    return model


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float) -> None:
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


class BackboneAlone:
    """The backbone's own training work: forward, backward from fixed feature gradients, clip, AdamW."""

    def __init__(self, joint: TICOD, cfg: Config, batches: list[Batch], device: torch.device) -> None:
        self.holder = nn.Module()
        self.holder.backbone = copy.deepcopy(joint.backbone)  # named "backbone.*": backbone_lr group
        self.opt = build_optimizer(self.holder, cfg.optim, fused=device.type == "cuda")
        self.cfg, self.device = cfg, device
        with torch.no_grad():
            feats = [self.features(b) for b in batches]
        gen = torch.Generator().manual_seed(0)
        self.grads = [
            [torch.randn(f.shape, generator=gen).to(device, f.dtype) for f in fs.values()] for fs in feats
        ]

    def features(self, b: Batch) -> dict[str, torch.Tensor]:
        bb = self.holder.backbone
        with autocast(self.cfg, self.device):
            return bb(pad_to_multiple(b.images, bb.size_divisor))

    def train_step(self, i: int, b: Batch) -> None:
        self.holder.train()
        feats = self.features(b)
        torch.autograd.backward(list(feats.values()), self.grads[i])
        clip_and_step(self.holder, self.opt, self.cfg.optim.grad_clip)


def consistency(sides: dict[str, Side], b: Batch) -> dict[str, float]:
    """Largest differences between the joint model's outputs and the separate models' (expected 0)."""
    out: dict[str, float] = {}
    with torch.no_grad():
        losses = {}
        for task, side in sides.items():
            torch.manual_seed(123)  # proposal / RoI sampling draw from torch's RNG
            side.model.train()
            losses[task] = side.losses(b)
        out["loss_det"] = float((losses["joint"]["loss_det"] - losses["detection"]["loss_det"]).abs())
        out["loss_cap"] = float((losses["joint"]["caption"] - losses["caption"]["caption"]).abs())
    preds = {task: side.predict(b) for task, side in sides.items()}
    box_diff, same_captions = 0.0, True
    for j, d, c in zip(preds["joint"], preds["detection"], preds["caption"], strict=True):
        if j["boxes"].shape != d["boxes"].shape:
            box_diff = float("inf")
        elif len(j["boxes"]):
            box_diff = max(box_diff, float((j["boxes"] - d["boxes"]).abs().max()))
        same_captions &= torch.equal(j["caption_ids"], c["caption_ids"])
    out["boxes"] = box_diff
    out["captions_differ"] = float(not same_captions)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    report = Report("multitask", device, vars(args))
    with workdir() as tmp:
        shards = args.data or make_demo_data(tmp, args.images)[1]
        cfg = {t: bench_config(args, shards, f"loss.task={t}", *fixed(t)) for t in TASKS}
        tok = load_tokenizer(f"{shards}/tokenizer")
        batches = [
            b.to(device, non_blocking=False) for b in fixed_batches(cfg["joint"], tok, args.steps, args.seed)
        ]
    torch.manual_seed(args.seed)
    joint0 = TICOD(
        cfg["joint"].model, cfg["joint"].loss, model_vocab(cfg["joint"], tok), tok.bos_token_id, tok.eos_token_id,
        tok.pad_token_id,
    )  # fmt: skip
    weights = {k: v.clone() for k, v in joint0.state_dict().items()}
    sides = {t: Side(t, cfg[t], weights, tok, device) for t in TASKS}
    bb = BackboneAlone(sides["joint"].model, cfg["joint"], batches, device)
    n_params = {t: sum(p.numel() for p in s.model.parameters()) for t, s in sides.items()}
    print(
        f"parameters: {n_params}, batch {len(batches[0]['image_sizes'])} x {tuple(batches[0]['images'].shape[-2:])}"
    )

    report.extra["consistency_max_abs_diff"] = consistency(sides, batches[0])
    print(f"joint vs separate outputs (max abs diff, expected 0): {report.extra['consistency_max_abs_diff']}")

    # ---- training step time
    # One step per call, the batches in turn: rounds are short, so every side sees the same machine load.
    def train(side: Callable[[int, Batch], None]) -> Callable[[], float]:
        calls = itertools.count()

        def run() -> float:
            i = next(calls) % len(batches)
            return timed(lambda: side(i, batches[i]), device)

        return run

    print("training steps (s/step):")
    t = run_alternating(
        {
            "joint": train(lambda i, b: sides["joint"].train_step(b)),
            "detection": train(lambda i, b: sides["detection"].train_step(b)),
            "caption": train(lambda i, b: sides["caption"].train_step(b)),
            "backbone": train(bb.train_step),
        },
        repeats=args.repeats,
        warmup=args.warmup,
    )
    separate = [d + c for d, c in zip(t["detection"], t["caption"], strict=True)]
    rows = [
        Row("joint model", t["joint"], "s/step", "det-only + caption-only"),
        Row("det-only model", t["detection"], "s/step", "det-only + caption-only"),
        Row("caption-only model", t["caption"], "s/step", "det-only + caption-only"),
        Row("det-only + caption-only", separate, "s/step", note="sum per round"),
        Row("backbone alone (f_bb)", t["backbone"], "s/step", "det-only + caption-only", "saving ceiling"),
    ]
    report.table("Training step: joint vs. two separate models", rows)
    f_bb = rows[4].ratio or 0.0
    report.check(Target("joint step / (det + caption steps)", rows[0].ratio or 0.0, 1 - 0.8 * f_bb, False,
                        f"1 - 0.8·f_bb, f_bb = {f_bb:.3f}"))  # fmt: skip
    report.extra["f_bb"] = f_bb
    per_round = [j / s for j, s in zip(t["joint"], separate, strict=True)]
    report.extra["joint_over_separate_per_round_median"] = statistics.median(per_round)
    saved = 1 - (rows[0].ratio or 0.0)
    report.extra["share_of_possible_saving"] = saved / f_bb if f_bb else None
    print(f"f_bb = {f_bb:.3f}: sharing saved {saved:.1%} of the two models' time, "
          f"{saved / f_bb:.0%} of the {f_bb:.1%} it can save")  # fmt: skip

    # ---- inference
    def infer(task: str) -> Callable[[], float]:
        calls = itertools.count()

        def run() -> float:
            b = batches[next(calls) % len(batches)]
            return timed(lambda: sides[task].predict(b), device)

        return run

    print("inference (s/batch):")
    t = run_alternating(
        {"joint": infer("joint"), "detection": infer("detection"), "caption": infer("caption")},
        repeats=args.repeats,
        warmup=args.warmup,
    )
    separate = [d + c for d, c in zip(t["detection"], t["caption"], strict=True)]
    rows = [
        Row("joint model (boxes + caption)", t["joint"], "s/batch", "det-only + caption-only"),
        Row("det-only model", t["detection"], "s/batch", "det-only + caption-only"),
        Row("caption-only model", t["caption"], "s/batch", "det-only + caption-only"),
        Row("det-only + caption-only", separate, "s/batch", note="sum per round"),
    ]
    report.table("Inference: boxes + caption from one model vs. two", rows)

    # ---- peak memory (deterministic: one measurement per side)
    def train_memory(task: str) -> float:
        def run() -> None:
            side = Side(task, cfg[task], weights, tok, device)
            for b in batches[:2]:  # the second step has AdamW state and gradients as well
                side.train_step(b)

        return float(peak_memory(run, device)[1])

    def infer_memory(task: str) -> float:
        def run() -> None:
            Side(task, cfg[task], weights, tok, device).predict(batches[0])

        return float(peak_memory(run, device)[1])

    mem = {
        (kind, task): mib(fn(task))
        for kind, fn in (("train", train_memory), ("infer", infer_memory))
        for task in TASKS
    }
    rows = []
    for kind, label in (("train", "training"), ("infer", "inference")):
        both = mem[(kind, "detection")] + mem[(kind, "caption")]
        rows += [
            Row(f"{label}: joint model", [mem[(kind, "joint")]], "MiB", f"{label}: det-only + caption-only"),
            Row(f"{label}: det-only model", [mem[(kind, "detection")]], "MiB"),
            Row(f"{label}: caption-only model", [mem[(kind, "caption")]], "MiB"),
            Row(f"{label}: det-only + caption-only", [both], "MiB"),
        ]
    report.table("Peak tensor memory (weights, gradients, AdamW state, activations)", rows)
    report.check(Target("joint training peak memory / two models added", rows[0].ratio or 0.0, 0.85, False))
    report.finish(args.out)
    return 0


def fixed(task: str) -> list[str]:
    # Separate models need the settings a single task allows (uncertainty weighting balances two tasks).
    return [] if task == "joint" else ["loss.balance=fixed", "model.captioner.use_fpn_levels=false"]


if __name__ == "__main__":
    sys.exit(main())
