"""Training throughput through the DeepSpeed engine: images/s per device, model FLOPs utilisation, peak memory.

``python tools/bench/train.py --config configs/ticod_large.yaml --device cuda --image-size 1333x800``
(GPU: bf16 autocast, gradient checkpointing and ZeRO-2 come from the config; on several GPUs run it under
``deepspeed --num_gpus N`` or ``torchrun``). The CPU default (the demo config) only exercises the code.

A step is what ``ticod.train`` does: ``engine(batch)``, ``engine.backward``, ``engine.step`` (grad clip,
AdamW, schedule) on fixed batches of the demo shards resized to ``--image-size``, after warm-up rounds.
``--profile FILE`` also runs one round under ``torch.profiler`` and writes its op tables (by self GPU time
and by self CPU time) to FILE: where a host-bound step spends its time.

MFU = model FLOPs per step × steps/s ÷ the device's peak dense bf16 FLOP/s (H100/H200 SXM: 989e12; pass
``--peak-tflops`` otherwise). Model FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on
one forward + backward of the same batch with checkpointing switched off, so the recomputation that
checkpointing adds is not counted (the usual MFU definition); matmuls and convolutions count
2 × multiply-adds. Ops the counter does not know (RoIAlign, NMS, elementwise) are not counted, so MFU is
a slight underestimate.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from common import (
    Report,
    Row,
    Target,
    add_common_args,
    alternate,
    autocast,
    bench_config,
    count_flops,
    fixed_batches,
    make_demo_data,
    mib,
    model_vocab,
    peak_flops,
    peak_memory,
    setup,
    sync,
    timed,
    workdir,
)

from ticod import engine as engine_lib
from ticod.data.samples import Batch
from ticod.data.tokenizer import load_tokenizer
from ticod.distributed import backend_for, world_info_from_env
from ticod.models import TICOD

LARGE_TARGET = 15.0  # images/s per H100 for TICOD-large at 1333×800 (issue 8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/train.json")
    p.add_argument("--profile", default="", help="also profile one round of steps: op tables to this file")
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--images", type=int, default=32, help="demo images to generate (without --data)")
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: by GPU name)"
    )
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    info = world_info_from_env()
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    engine_lib.init_distributed(backend_for(device), 600)
    report = Report("train", device, vars(args))
    with workdir() as tmp:
        shards = args.data or make_demo_data(tmp, args.images)[1]
        cfg = bench_config(args, shards, f"max_steps={10_000}", "optim.warmup_steps=1")
        tok = load_tokenizer(f"{shards}/tokenizer")
        batches = [
            b.to(device, non_blocking=False)
            for b in fixed_batches(cfg, tok, args.steps, args.seed + info.rank)
        ]
    torch.manual_seed(args.seed)
    model = TICOD(
        cfg.model, cfg.loss, model_vocab(cfg, tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())

    # Model FLOPs of one step: forward + backward without recomputation.
    ckpt = cfg.model.backbone.grad_checkpointing or cfg.model.captioner.grad_checkpointing
    model.set_grad_checkpointing(False)
    b = batches[0]

    def fwd_bwd() -> None:
        with autocast(cfg, device):
            losses = model(b.images, targets=b.targets, captions=b.captions, image_sizes=b.image_sizes)
        losses["loss"].backward()

    flops = [count_flops(fwd_bwd) for b in batches]
    model.zero_grad(set_to_none=True)
    model.backbone.set_grad_checkpointing(cfg.model.backbone.grad_checkpointing)
    if model.captioner is not None:
        model.captioner.set_grad_checkpointing(cfg.model.captioner.grad_checkpointing)

    engine = engine_lib.build_engine(model, cfg, info.world_size)
    engine.train()

    def step(b: Batch) -> None:
        losses = engine(b.images, targets=b.targets, captions=b.captions, image_sizes=b.image_sizes)
        engine.backward(losses["loss"])
        engine.step()

    def round_() -> float:
        return sum(timed(lambda b=b: step(b), device) for b in batches) / len(batches)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        print("s/step:")
        t = alternate({"train": round_}, repeats=args.repeats, warmup=args.warmup)["train"]
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)  # everything: weights, ZeRO state, activations
    else:
        print("s/step:")
        t = alternate({"train": round_}, repeats=args.repeats, warmup=args.warmup)["train"]
        peak = peak_memory(lambda: step(batches[0]), device)[1]  # one step above the settled state
    if args.profile and info.rank == 0:
        profile_steps(lambda: [step(b) for b in batches], device, args.profile)
    batch = len(batches[0]["image_sizes"])
    per_step_flops = sum(flops) / len(flops)
    peak_dev = peak_flops(device, args.peak_tflops)
    rows = [
        Row("step time", t, "s/step"),
        Row("images/s per device", [batch / x for x in t], "images/s"),
        Row("model TFLOP per step", [per_step_flops / 1e12], "TFLOP", note="fwd + bwd, no recompute"),
        Row("achieved TFLOP/s", [per_step_flops / x / 1e12 for x in t], "TFLOP/s"),
    ]
    if peak_dev:
        rows.append(
            Row("MFU", [per_step_flops / x / peak_dev for x in t], "fraction", note=f"peak {peak_dev:.3g}")
        )
    rows.append(
        Row(
            "peak memory" if device.type == "cuda" else "peak tensor memory of a step",
            [mib(peak)],
            "MiB",
            note="max_memory_allocated" if device.type == "cuda" else "above weights + AdamW state",
        )
    )
    shape = tuple(batches[0]["images"].shape[-2:])
    title = (
        f"Training throughput: {args.config.rsplit('/', 1)[-1]}, {n_params / 1e6:.1f}M params, batch {batch} × "
        f"{shape}, {cfg.deepspeed.precision.value}, ZeRO-{cfg.deepspeed.zero_stage}, checkpointing {'on' if ckpt else 'off'}, "
        f"{info.world_size} rank(s)"
    )
    report.table(title, rows)
    if device.type == "cuda" and "large" in args.config and "H100" in torch.cuda.get_device_name(device):
        report.check(Target("TICOD-large images/s per H100", rows[1].median, LARGE_TARGET, True))
    report.extra.update(params=n_params, flops_per_step=per_step_flops, peak_memory_bytes=peak)
    if info.rank == 0:
        report.finish(args.out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def profile_steps(fn: Any, device: torch.device, out: str) -> None:
    """Op tables of one round under torch.profiler: by self device time (GPU) and by self CPU time."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    avg = prof.key_averages()
    keys = (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]
    text = "\n\n".join(f"sorted by {k}:\n" + avg.table(sort_by=k, row_limit=40) for k in keys)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(text[:6000])


if __name__ == "__main__":
    sys.exit(main())
