"""The first-GPU check (issue 15): throughput, an overfit on real COCO, eval, predict and bf16 vs fp32 in one table.

``python tools/gpu_check.py --out gpu_check`` on one H100/H200 (about 5 minutes; it stops starting parts
after ``--budget-s``, default 420 s, so the whole run stays inside 8 minutes). Parts, in order of value:

1. TICOD-large training images/s per GPU at 1333×800, bf16, gradient checkpointing, ZeRO-2, batch 2, with
   MFU and peak memory: ``tools/bench/train.py`` (its FLOP count and MFU definition), in a subprocess.
2. The same for TICOD-small.
3. A 30-step overfit of the demo-size model on ``--coco`` (the 80 real COCO images of
   ``../shared/coco_sample``, 80 classes), sharded with ``ticod.shard_coco``, trained with ``ticod.train``;
   the loss must fall (mean of the last 5 logged steps below the mean of the first 5).
4. ``ticod.evaluate`` and ``ticod.predict`` of that run, on the GPU.
5. The first-step loss of ``ticod.train`` in fp32 and in bf16 from the same seed (weights and batch).

``--cpu-small`` runs every part on the CPU at a reduced size (small images, batch 1, one timed step) so
that the script is known to work before a GPU is lent; its numbers say nothing about GPU speed.

Needs the repo (on ``PYTHONPATH``) and the packages of docs' GPU notes (deepspeed, omegaconf, webdataset,
pycocotools, ...); pycocoevalcap and java only for the caption metrics of part 4. Every part runs in its
own process: a part that fails is a row saying why, and the next part still runs. Writes
``OUT/gpu_check.json`` (the table, every part's details, the machine) and ``OUT/<part>/`` logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(ROOT / "tools" / "bench")]

import torch  # noqa: E402
from common import COCO_SAMPLE, Report, Row  # noqa: E402  (tools/bench/common.py)

DEFAULT_COCO = COCO_SAMPLE
BENCH_TRAIN = ROOT / "tools" / "bench" / "train.py"
OVERFIT_STEPS = 30
REL_LOSS_TOL = 0.01  # bf16 vs fp32 first-step loss (as tests/test_precision.py)


@dataclass
class Size:
    """What differs between the GPU run and ``--cpu-small``."""

    device: str
    image_size: str  # WxH of the throughput parts
    batch_size: int
    steps: int  # timed steps per round
    repeats: int
    warmup: int
    overfit_batch: int
    overfit_sizes: str  # data.train_min_sizes / test_min_size / max_size of the overfit run
    model_set: tuple[str, ...] = ()  # overrides of the throughput parts' models


GPU = Size("cuda", "1333x800", 2, 3, 3, 1, 8, "[320, 352, 384]|384|576")
# Swin-B + GPT-2 in bf16 take minutes per step on a CPU without AVX-512: the throughput parts keep their
# configs' settings (bf16, checkpointing, ZeRO-2, GPT-2 vocabulary) with the demo's widths and depths.
CPU_SMALL = Size(
    "cpu",
    "192x128",
    1,
    1,
    1,
    0,
    2,
    "[128]|128|192",
    (
        "model.backbone.kwargs={embed_dim: 32, depths: [1, 1, 2, 1], num_heads: [1, 2, 4, 8], window_size: 4}",
        "model.fpn_channels=64",
        "model.roi.representation_size=256",
        "model.captioner.n_layer=2",
        "model.captioner.n_head=4",
        "model.captioner.n_embd=128",
    ),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check", help="results dir (gpu_check.json, per-part logs)")
    p.add_argument("--coco", default=str(DEFAULT_COCO), help="COCO sample: images/, *_train2017.json")
    p.add_argument("--cpu-small", action="store_true", help="every part on the CPU at a reduced size")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many seconds")
    p.add_argument("--part-timeout-s", type=float, default=240.0, help="kill a part after this long")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["large", "small", "overfit", "eval", "predict", "precision"]
    )
    return p.parse_args(argv)


class Runner:
    """Runs the parts as subprocesses under one time budget and collects their rows."""

    def __init__(self, args: argparse.Namespace, size: Size) -> None:
        self.args, self.size = args, size
        self.out = Path(args.out).resolve()
        self.start = time.monotonic()
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        if size.device == "cpu":
            self.env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(k, None)

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def run(self, part: str, cmd: list[str]) -> subprocess.CompletedProcess | None:
        """``cmd`` in ROOT with its output in OUT/part/log.txt; None (and a row) if it did not run or failed."""
        if part in self.args.skip:
            return None
        if self.left() <= 0:
            self.fail(part, "not started: time budget spent")
            return None
        log_dir = self.out / part
        log_dir.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        print(f"\n== {part}: {' '.join(cmd)}", flush=True)
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=min(self.args.part_timeout_s, max(self.left(), 30.0) + 60.0),
            )
        except subprocess.TimeoutExpired as e:
            self.fail(part, f"killed after {time.monotonic() - t:.0f} s")
            (log_dir / "log.txt").write_text(f"{e.stdout or ''}\n{e.stderr or ''}")
            return None
        (log_dir / "log.txt").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        self.details.setdefault(part, {})["seconds"] = round(time.monotonic() - t, 1)
        print(f"   {part}: exit {proc.returncode} in {time.monotonic() - t:.0f} s", flush=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
            self.fail(part, f"exit {proc.returncode}: {last[:160]}")
            return None
        return proc

    def fail(self, part: str, why: str) -> None:
        print(f"   {part}: FAILED {why}", flush=True)
        self.details.setdefault(part, {})["error"] = why
        self.rows.append(Row(f"{part}: FAILED", [math.nan], "", note=why))


# --------------------------------------------------------------------------------------------- parts
def throughput(r: Runner, name: str) -> None:
    """Images/s, MFU and peak memory of one shipped config, as tools/bench/train.py measures them."""
    s = r.size
    out = r.out / name / "train.json"
    cmd = [sys.executable, str(BENCH_TRAIN), "--config", f"ticod_{name}", "--device", s.device]
    cmd += ["--image-size", s.image_size, "--batch-size", str(s.batch_size), "--precision", "bf16"]
    cmd += ["--steps", str(s.steps), "--repeats", str(s.repeats), "--warmup", str(s.warmup)]
    cmd += ["--images", str(max(4, s.steps * s.batch_size)), "--threads", "0", "--out", str(out)]
    cmd += ["--set", "model.backbone.grad_checkpointing=true", "deepspeed.zero_stage=2", *s.model_set]
    if r.run(name, cmd) is None:
        return
    result = json.loads(out.read_text())
    (title, rows), *_ = result["tables"].items()
    by_name = {row["name"]: row for row in rows}
    r.details[name].update(title=title, params=result["params"], flops_per_step=result["flops_per_step"])
    setting = title.split(", ", 1)[-1]  # params, batch × shape, precision, ZeRO, checkpointing
    for key, note in (
        ("images/s per device", setting),
        ("MFU", "tools/bench/train.py: model FLOPs without recompute / bf16 peak"),
        ("peak memory", "torch.cuda.max_memory_allocated"),
        ("peak tensor memory of a step", "CPU: above weights + AdamW state"),
    ):
        if key in by_name:
            row = by_name[key]
            r.rows.append(Row(f"TICOD-{name}: {key}", row["values"], row["unit"], note=note))


def shard_coco(r: Runner, shards: Path) -> bool:
    """The COCO sample as train and val shards (the same 80 images) with a BPE tokenizer."""
    coco = Path(r.args.coco)
    for split in ("train", "val"):
        cmd = [sys.executable, "-m", "ticod.shard_coco", "--images", str(coco / "images")]
        cmd += ["--instances", str(coco / "instances_train2017.json")]
        cmd += ["--captions", str(coco / "captions_train2017.json"), "--out", str(shards), "--split", split]
        cmd += ["--no-progress", "--overwrite"] + (["--train-tokenizer", "1000"] if split == "train" else [])
        if r.run(f"shard_{split}", cmd) is None:
            return False
    return True


def train_cmd(r: Runner, shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    mins, test, most = r.size.overfit_sizes.split("|")
    return [
        sys.executable,
        "-m",
        "ticod.train",
        "--config",
        "demo",
        f"run_dir={run_dir}",
        f"data.shards_dir={shards}",
        "model.num_classes=80",
        f"data.batch_size={r.size.overfit_batch}",
        f"data.train_min_sizes={mins}",
        f"data.test_min_size={test}",
        f"data.max_size={most}",
        "data.num_workers=2",
        "logging.log_every=1",
        "logging.progress_bar=false",
        "eval.at_end=false",
        "eval.bertscore=false",
        *overrides,
    ]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def overfit(r: Runner, shards: Path, run_dir: Path) -> bool:
    """30 steps at a constant lr after 3 warm-up steps; the loss must fall."""
    cmd = train_cmd(r, shards, run_dir, f"max_steps={OVERFIT_STEPS}", "optim.warmup_steps=3")
    cmd += ["optim.min_lr_ratio=1.0", "checkpoint.save_every=0"]
    if r.run("overfit", cmd) is None:
        return False
    curve = losses(run_dir)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    r.details["overfit"].update(losses=curve)
    note = "FALLING" if last < first else "NOT FALLING"
    r.rows.append(Row("overfit: loss, first 5 steps", [first], "loss", note=f"{len(curve)} steps"))
    r.rows.append(
        Row("overfit: loss, last 5 steps", [last], "loss", "overfit: loss, first 5 steps", note=note)
    )
    return True


def evaluate(r: Runner, run_dir: Path, shards: Path) -> None:
    out = r.out / "eval" / "result"
    cmd = [sys.executable, "-m", "ticod.evaluate", "--checkpoint", str(run_dir), "--data", str(shards)]
    cmd += ["--out", str(out), "eval.bertscore=false"]
    if r.run("eval", cmd) is None:
        return
    metrics = json.loads((out / "metrics.json").read_text())
    r.details["eval"].update(metrics=metrics)
    for key in ("AP", "AP50", "CIDEr"):
        if key in metrics:
            r.rows.append(Row(f"eval: {key}", [float(metrics[key])], "", note="the 80 training images"))
    r.rows.append(Row("eval: wall time", [r.details["eval"]["seconds"]], "s", note="process incl. start"))


def predict(r: Runner, run_dir: Path) -> None:
    out = r.out / "predict" / "result"
    images = sorted((Path(r.args.coco) / "images").glob("*.jpg"))[:8]
    cmd = [sys.executable, "-m", "ticod.predict", "--checkpoint", str(run_dir), *map(str, images)]
    cmd += ["--out", str(out), "--device", r.size.device]
    if r.run("predict", cmd) is None:
        return
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    boxes = sum(len(x.get("detections", [])) for x in results)
    r.rows.append(Row("predict: images written", [len(results)], "images", note=f"{boxes} boxes in all"))
    r.rows.append(
        Row("predict: wall time", [r.details["predict"]["seconds"]], "s", note="process incl. start")
    )


def precision(r: Runner, shards: Path) -> None:
    """First-step loss of the same seed (weights, batch, samplers) in fp32 and bf16."""
    first = {}
    for p in ("fp32", "bf16"):
        run_dir = r.out / "precision" / p
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = train_cmd(r, shards, run_dir, "max_steps=1", "optim.warmup_steps=0", f"deepspeed.precision={p}")
        if r.run(f"precision_{p}", cmd) is None:
            return
        first[p] = losses(run_dir)[0]
    rel = abs(first["bf16"] - first["fp32"]) / abs(first["fp32"])
    r.details["precision"] = {**first, "relative_difference": rel}
    r.rows.append(Row("first-step loss fp32", [first["fp32"]], "loss"))
    verdict = "OK" if rel <= REL_LOSS_TOL and math.isfinite(first["bf16"]) else "DIFFERS"
    r.rows.append(
        Row(
            "first-step loss bf16",
            [first["bf16"]],
            "loss",
            "first-step loss fp32",
            note=f"{verdict} (tol {REL_LOSS_TOL})",
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = CPU_SMALL if args.cpu_small else GPU
    if size.device == "cuda" and not torch.cuda.is_available():
        print("no GPU visible: run with --cpu-small for the reduced CPU check", file=sys.stderr)
        return 2
    r = Runner(args, size)
    r.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if size.device == "cuda" else "cpu")
    if device.type == "cuda":
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout, flush=True)
    throughput(r, "large")
    throughput(r, "small")
    work = r.out / "work"
    shards, run_dir = work / "coco_shards", work / "overfit_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    if shard_coco(r, shards):
        if "overfit" not in args.skip and overfit(r, shards, run_dir):
            evaluate(r, run_dir, shards)
            predict(r, run_dir)
        if "precision" not in args.skip:
            precision(r, shards)
    report = Report("gpu_check", device, vars(args))
    mode = "CPU, reduced size (--cpu-small)" if args.cpu_small else "GPU"
    report.table(f"TICOD GPU check: {mode}, {time.monotonic() - r.start:.0f} s", r.rows)
    report.extra.update(parts=r.details)
    report.finish(r.out / "gpu_check.json")
    return 1 if any(row.name.endswith("FAILED") for row in r.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
