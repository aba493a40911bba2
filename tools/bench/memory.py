"""Memory: gradient checkpointing on vs. off, and per-rank model state of ZeRO stages 0/1/2/3 with 2 ranks.

``python tools/bench/memory.py [--zero-stages 0 1 2 3 --zero-steps 10] [--skip-zero | --skip-ckpt]``

**Gradient checkpointing** (``model.backbone.grad_checkpointing``, ``model.roi.grad_checkpointing`` and
``model.captioner.grad_checkpointing``, all through ``TICOD.set_grad_checkpointing``): two copies of the same model, alternating training steps.
Peak activation memory = the peak of tensor memory during forward + backward above what is allocated
before it (weights, AdamW state, gradients allocated as after any step): activations plus backward
temporaries. Measured for the whole model and for the backbone alone
(the FPN and RPN are not checkpointed; the cascade stages recompute RoIAlign + box head).

**ZeRO**: ``deepspeed --num_gpus 2`` (``DS_ACCELERATOR=cpu``, gloo) runs this script as a worker per stage:
the demo model through :func:`ticod.engine.build_engine`, ``--zero-steps`` steps on the same per-rank
batches. After the last backward (before its optimizer step) each rank sums the bytes of the distinct
tensor storages it holds, by kind: module parameters (stage 3: the rank's partition), gradients (``.grad``
and the ZeRO optimizer's gradient partitions), Adam moments (``exp_avg``, ``exp_avg_sq``) and the fp32
master copy ZeRO keeps of its partition. The weights after the last step (consolidated from a DeepSpeed
checkpoint) are compared with stage 0's.

Accounting. The ZeRO paper's (2 + 14/N)·Ψ bytes per rank for stage 2 assume mixed precision: fp16/bf16
parameters (2 bytes, every rank) and gradients (2, partitioned), fp32 master weights + Adam m + v (12,
partitioned). TICOD's bf16 mode is DeepSpeed ``torch_autocast`` (ticod/engine.py): the module weights stay
fp32 and bf16 exists only inside autocast, so its real per-rank bytes are 4Ψ (weights) + (4 + 4 + 8)Ψ/N
(gradients, DeepSpeed's fp32 master copy, m + v) at stage 2. The run reports both: the measured bytes,
and the measured element counts priced at the paper's bytes per element, which checks that each
stage partitions what the paper says it does (padding included).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from common import (
    ROOT,
    Report,
    Row,
    Target,
    add_common_args,
    alternate,
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
from multitask import BackboneAlone, Side

from ticod.config import Config
from ticod.data.samples import Batch
from ticod.data.tokenizer import load_tokenizer
from ticod.models import TICOD

# The ZeRO paper's per-rank bytes per parameter (mixed precision, Adam) for N ranks.
PAPER = {0: lambda n: 16.0, 1: lambda n: 4 + 12 / n, 2: lambda n: 2 + 14 / n, 3: lambda n: 16 / n}
# What DeepSpeed holds with fp32 module weights (TICOD's fp32 and torch_autocast bf16 modes): stage 0 is
# torch AdamW (weights, gradients, m, v); stages 1 and 2 keep full fp32 weights plus a partitioned fp32
# master copy, m, v and reduced gradients (stage 1 too, without gradient accumulation); stage 3's fp32
# partitions are the master weights themselves.
FP32 = {0: lambda n: 16.0, 1: lambda n: 4 + 16 / n, 2: lambda n: 4 + 16 / n, 3: lambda n: 16 / n}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/memory.json")
    p.add_argument("--steps", type=int, default=2, help="training steps per side per round (checkpointing)")
    p.add_argument("--images", type=int, default=48, help="demo images to generate (without --data)")
    p.add_argument("--skip-ckpt", action="store_true", help="only the ZeRO part")
    p.add_argument("--skip-zero", action="store_true", help="only the checkpointing part")
    p.add_argument("--zero-stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--zero-steps", type=int, default=10)
    p.add_argument("--zero-batch-size", type=int, default=1, help="per rank")
    p.add_argument("--zero-timeout", type=int, default=600, help="seconds per stage run")
    # Worker mode (run by the deepspeed launcher).
    p.add_argument("--zero-worker", type=int, default=-1, metavar="STAGE", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -------------------------------------------------------------------------- gradient checkpointing
def checkpointing(args: argparse.Namespace, report: Report, device: torch.device, shards: str | Path) -> None:
    cfg = bench_config(args, shards)
    tok = load_tokenizer(f"{shards}/tokenizer")
    batches = [b.to(device, non_blocking=False) for b in fixed_batches(cfg, tok, args.steps, args.seed)]
    torch.manual_seed(args.seed)
    model = TICOD(
        cfg.model, cfg.loss, model_vocab(cfg, tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )
    weights = model.state_dict()
    sides = {on: Side("joint", cfg, weights, tok, device) for on in (False, True)}
    for on, side in sides.items():
        side.model.set_grad_checkpointing(on)
    backbones = {on: BackboneAlone(sides[False].model, cfg, batches, device) for on in (False, True)}
    for on, bb in backbones.items():
        bb.holder.backbone.set_grad_checkpointing(on)

    def activations(on: bool) -> float:
        side = sides[on]
        side.train_step(batches[0])  # AdamW state exists
        for p in side.model.parameters():  # gradients exist (as after any step): not part of the peak
            p.grad = torch.zeros_like(p)
        torch.manual_seed(0)  # the same proposal sampling on both sides
        return float(peak_memory(lambda: side.losses(batches[0])["loss"].backward(), device)[1])

    def backbone_activations(on: bool) -> float:
        bb = backbones[on]
        bb.train_step(0, batches[0])
        for p in bb.holder.parameters():
            p.grad = torch.zeros_like(p)

        def fwd_bwd() -> None:
            torch.autograd.backward(list(bb.features(batches[0]).values()), bb.grads[0])

        return float(peak_memory(fwd_bwd, device)[1])

    mem = {on: mib(activations(on)) for on in (False, True)}
    bb_mem = {on: mib(backbone_activations(on)) for on in (False, True)}

    def steps(on: bool) -> Any:
        return lambda: sum(timed(lambda b=b: sides[on].train_step(b), device) for b in batches) / len(batches)

    print("training step with / without gradient checkpointing (s/step):")
    t = alternate({"off": steps(False), "on": steps(True)}, repeats=args.repeats, warmup=args.warmup)
    rows = [
        Row("peak activations, checkpointing off", [mem[False]], "MiB"),
        Row("peak activations, checkpointing on", [mem[True]], "MiB", "peak activations, checkpointing off"),
        Row("backbone alone, off", [bb_mem[False]], "MiB"),
        Row("backbone alone, on", [bb_mem[True]], "MiB", "backbone alone, off"),
        Row("step time, checkpointing off", t["off"], "s/step"),
        Row("step time, checkpointing on", t["on"], "s/step", "step time, checkpointing off"),
    ]
    shape = tuple(batches[0]["images"].shape)
    report.table(f"Gradient checkpointing (backbone, cascade stages, caption decoder), batch {shape}", rows)
    report.check(Target("activation memory saved by checkpointing", 1 - (rows[1].ratio or 0), 0.5, True))
    report.check(Target("step time, checkpointing on / off", rows[5].ratio or 0, 1.25, False))


# ------------------------------------------------------------------------------------------ ZeRO
def _tensors(value: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors inside nested lists / tuples / dicts (the containers ZeRO keeps its buffers in)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)


def held_memory(engine: Any) -> dict[str, dict[str, int]]:
    """Bytes and elements of the distinct tensor storages this rank holds, by kind (see the module doc)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # the torch AdamW that holds the moments (ZeRO wraps it)
    seen: set[int] = set()
    nbytes: Counter[str] = Counter()
    elems: Counter[str] = Counter()

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None or not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        nbytes[kind] += storage.nbytes()
        elems[kind] += storage.nbytes() // t.element_size()

    params = list(engine.module.parameters())
    for p in params:
        add("parameters", getattr(p, "ds_tensor", p))  # stage 3 keeps only the partition
    for group in inner.param_groups:
        for p in group["params"]:
            add("master_weights", p)  # ZeRO's own fp32 partition; stage 0's are the module weights (seen)
    for state in inner.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            add("adam_moments", state.get(key))
    sources: Counter[str] = Counter()  # where the gradient bytes live (ZeRO keeps them in several places)
    for where, tensors in (
        ("param.grad", [p.grad for p in params]),
        ("master.grad", [p.grad for g in inner.param_groups for p in g["params"]]),
        *((f"optimizer.{k}", list(_tensors(v))) for k, v in vars(opt).items() if "grad" in k.lower()),
    ):
        before = nbytes["gradients"]
        for t in tensors:
            add("gradients", t)
        if nbytes["gradients"] > before:
            sources[where] += nbytes["gradients"] - before
    for obj in gc.get_objects():  # what else is alive: reduction buckets, model buffers, the batch
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            add("other", obj)
    return {"bytes": dict(nbytes), "elements": dict(elems), "gradient_sources": dict(sources)}


def zero_worker(args: argparse.Namespace) -> int:
    """One rank of one stage (under the deepspeed launcher): train, measure, save a checkpoint."""
    from ticod import engine as engine_lib
    from ticod.data.train_stream import build_train_loader
    from ticod.distributed import backend_for, select_device, world_info_from_env

    stage = args.zero_worker
    info = world_info_from_env()
    device = select_device(info)
    engine_lib.init_distributed(backend_for(device), 300)
    cfg = zero_config(args, stage)
    tok = load_tokenizer(f"{args.data}/tokenizer")
    model = initial_model(cfg, tok).to(device)
    psi = sum(p.numel() for p in model.parameters())
    engine = engine_lib.build_engine(model, cfg, info.world_size)
    torch.manual_seed(cfg.seed + 1000 * info.rank)  # as ticod.train: per-rank sampling
    loader = build_train_loader(cfg.data, tok, rank=info.rank, world_size=info.world_size, seed=cfg.seed)
    batches = iter(loader)
    held: dict[str, Any] = {}
    step_times = []
    engine.train()
    for step in range(args.zero_steps):
        b = next(batches).to(device, non_blocking=False)

        def train_step(b: Batch = b, last: bool = step == args.zero_steps - 1) -> None:
            losses = engine(b.images, targets=b.targets, captions=b.captions, image_sizes=b.image_sizes)
            engine.backward(losses["loss"])
            if last:
                held.update(held_memory(engine))
            engine.step()

        step_times.append(timed(train_step, device))
    engine.save_checkpoint(args.result_dir, tag=f"stage{stage}", save_latest=False)
    out = {"stage": stage, "rank": info.rank, "world_size": info.world_size, "psi": psi, **held}
    out["step_time_s"] = step_times
    Path(args.result_dir, f"stage{stage}_rank{info.rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    return 0


def zero_config(args: argparse.Namespace, stage: int) -> Config:
    steps = max(args.zero_steps, 2)
    return bench_config(
        args,
        args.data,
        f"deepspeed.zero_stage={stage}",
        f"data.batch_size={args.zero_batch_size}",
        f"max_steps={steps}",
        "optim.warmup_steps=1",  # full learning rate from step 2: the weights move, differences show
    )


def initial_model(cfg: Config, tok: Any) -> TICOD:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every stage
    return TICOD(
        cfg.model, cfg.loss, model_vocab(cfg, tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_stage(args: argparse.Namespace, stage: int, shards: Path, result_dir: Path) -> list[dict[str, Any]]:
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", _port(), str(Path(__file__).resolve())]
    cmd += ["--zero-worker", str(stage), "--result-dir", str(result_dir), "--data", str(shards)]
    cmd += ["--config", args.config, "--zero-steps", str(args.zero_steps), "--seed", str(args.seed)]
    cmd += ["--zero-batch-size", str(args.zero_batch_size), "--threads", "1"]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.image_size:
        cmd += ["--image-size", args.image_size]
    if args.set:
        cmd += ["--set", *args.set]
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    if args.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.zero_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ZeRO stage {stage} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads((result_dir / f"stage{stage}_rank{r}.json").read_text()) for r in (0, 1)]


def zero(args: argparse.Namespace, report: Report, shards: Path, tmp: Path) -> None:
    from ticod.engine import consolidated_state_dict

    result_dir = tmp / "zero"
    result_dir.mkdir(exist_ok=True)
    cfg = zero_config(argparse.Namespace(**{**vars(args), "data": str(shards)}), 0)
    init = initial_model(cfg, load_tokenizer(f"{shards}/tokenizer")).state_dict()
    results, weights = {}, {}
    for stage in args.zero_stages:
        print(f"ZeRO stage {stage}: 2 ranks, {args.zero_steps} steps ...", flush=True)
        results[stage] = run_stage(args, stage, shards, result_dir)
        weights[stage] = consolidated_state_dict(result_dir / f"stage{stage}")
        shutil.rmtree(result_dir / f"stage{stage}")
    n = 2
    psi = results[args.zero_stages[0]][0]["psi"]
    rows: list[Row] = []
    facts: dict[int, dict[str, Any]] = {}
    for stage, ranks in results.items():

        def per_rank(kind: str, field: str = "bytes", ranks: list[dict[str, Any]] = ranks) -> list[float]:
            return [float(r[field].get(kind, 0)) for r in ranks]

        model_state = [
            sum(r["bytes"].get(k, 0) for k in ("parameters", "gradients", "adam_moments", "master_weights"))
            for r in ranks
        ]
        # Element counts priced at the paper's bytes: 2 per weight and gradient, 4 per master/m/v element;
        # stage 0 in fp32 has no separate master copy (its weights are it): count them as the paper would.
        paper = []
        for r in ranks:
            e = r["elements"]
            master = e.get("master_weights", 0) or e.get("parameters", 0)
            paper.append(
                2 * e.get("parameters", 0)
                + 2 * e.get("gradients", 0)
                + 4 * (master + e.get("adam_moments", 0))
            )
        step = [sorted(r["step_time_s"][1:])[len(r["step_time_s"][1:]) // 2] for r in ranks]
        diff = (
            max(float((weights[stage][k] - weights[0][k]).detach().abs().max()) for k in weights[0])
            if 0 in weights
            else None
        )
        moved = max(float((weights[stage][k].detach() - init[k].float()).abs().max()) for k in init)
        facts[stage] = {"weights_max_abs_diff_vs_stage0": diff, "weights_max_abs_change_from_init": moved}
        rows += [
            Row(f"stage {stage}: parameters", [mib(v) for v in per_rank("parameters")], "MiB/rank"),
            Row(f"stage {stage}: gradients", [mib(v) for v in per_rank("gradients")], "MiB/rank"),
            Row(
                f"stage {stage}: Adam moments (m, v)",
                [mib(v) for v in per_rank("adam_moments")],
                "MiB/rank",
                "stage 0: Adam moments (m, v)" if 0 in results else "",
            ),
            Row(f"stage {stage}: fp32 master copy", [mib(v) for v in per_rank("master_weights")], "MiB/rank"),
            Row(
                f"stage {stage}: model state, measured",
                [v / psi for v in model_state],
                "bytes/param",
                note=f"fp32 expectation {FP32[stage](n):.2f}",
            ),
            Row(
                f"stage {stage}: model state, paper pricing",
                [v / psi for v in paper],
                "bytes/param",
                note=f"paper {PAPER[stage](n):.2f}",
            ),
            Row(
                f"stage {stage}: other tensors",
                [mib(v) for v in per_rank("other")],
                "MiB/rank",
                note="reduce buckets, buffers, batch",
            ),
            Row(f"stage {stage}: step time", step, "s/step", "stage 0: step time" if 0 in results else ""),
        ]
    report.table(f"ZeRO stages, 2 ranks, Ψ = {psi:,} parameters (min/max over ranks)", rows)
    report.extra["zero"] = {"psi": psi, "ranks": n, "per_stage": facts, "raw": results}
    for stage, f in facts.items():
        print(f"stage {stage}: weights after {args.zero_steps} steps vs stage 0: max |diff| "
              f"{f['weights_max_abs_diff_vs_stage0']}, max change from init {f['weights_max_abs_change_from_init']:.3g}")  # fmt: skip
    by = {r.name: r for r in rows}
    if 0 in results and 2 in results:
        ratio = by["stage 2: Adam moments (m, v)"].ratio or 0.0
        report.check(
            Target("ZeRO-2 / stage 0 optimizer-state bytes per rank", ratio, 0.5 * 1.01, False, "+1% padding")
        )
    if 2 in results:
        priced = by["stage 2: model state, paper pricing"]
        err = max(abs(v / PAPER[2](n) - 1) for v in priced.values)
        report.check(
            Target("ZeRO-2 model state vs (2 + 14/N)Ψ, relative error", err, 0.02, False, "paper pricing")
        )
    for stage, f in facts.items():
        if stage and f["weights_max_abs_diff_vs_stage0"] is not None:
            report.check(Target(f"stage {stage} weights vs stage 0 after {args.zero_steps} steps, max |diff|",
                                f["weights_max_abs_diff_vs_stage0"], 1e-6, False))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.zero_worker >= 0:
        torch.set_num_threads(1)
        return zero_worker(args)
    device = setup(args)
    report = Report("memory", device, vars(args))
    with workdir() as tmp:
        shards = Path(args.data) if args.data else make_demo_data(tmp, args.images)[1]
        if not args.skip_ckpt:
            checkpointing(args, report, device, shards)
        if not args.skip_zero:
            zero(args, report, shards, tmp)
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
