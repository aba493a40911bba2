"""Learning real images: overfit the 80 real COCO train2017 images of ../shared/coco_sample on CPU.

``python tools/bench/coco_overfit.py [--steps N] [--nproc 2|1] [--set KEY=VALUE ...] [--work DIR]``

Shards the sample twice with tools/shard_coco.py (``train``, with its BPE tokenizer, and ``val``: the same
80 images), trains ``configs/coco_overfit.yaml`` (the demo's tiny Swin and GPT-2 with the Swin configs' box
head: 4conv1fc, class-specific, GIoU x 10; 80 classes, reduced size, no augmentation) with ``python -m
ticod.train`` (``--nproc 2``: the deepspeed launcher, 2 CPU ranks), evaluates on the same images at the end
as the trainer does, and prints box AP and caption BLEU-4 against the targets (the standard check that a
detector and a captioner can fit real data). Also the time: wall and CPU seconds of the whole run (start-up
and evaluation included) and per training step, so a run on a shared machine says what it costs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import ROOT, Report, Row, Target, add_coco_arg, run_in_own_group, workdir

from ticod import checkpoint as ck
from ticod.shard_coco import main as shard_coco

CONFIG = ROOT / "configs" / "coco_overfit.yaml"
AP_TARGET, BLEU4_TARGET = 0.5, 0.5  # issue 24 item 3
REPORTED = ("AP", "AP50", "AP75", "APs", "APm", "APl", "BLEU-1", "BLEU-4", "METEOR", "CIDEr", "ROUGE-L")
REPORTED += ("distinct_captions",)  # tests/test_coco_overfit.py has a floor on it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_coco_arg(p)
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default: the config's max_steps)")
    p.add_argument(
        "--nproc", type=int, default=2, help="CPU ranks (2, the config's size: the deepspeed launcher)"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--work", default="", help="keep shards and the run here (default: a temporary dir)")
    p.add_argument("--out", default="runs/bench/coco_overfit.json", help="result JSON")
    return p.parse_args(argv)


def shard_sample(coco: Path, out: Path) -> Path:
    """``train`` (with a 1000-token BPE of its captions in ``out/tokenizer``) and ``val`` of the same images."""
    if (out / "val-manifest.json").is_file():
        return out
    for split in ("train", "val"):
        args = ["--images", str(coco / "images"), "--instances", str(coco / "instances_train2017.json")]
        args += ["--captions", str(coco / "captions_train2017.json"), "--out", str(out), "--split", split]
        args += ["--no-progress", "--overwrite"] + (["--train-tokenizer", "1000"] if split == "train" else [])
        if shard_coco(args) != 0:
            raise RuntimeError(f"tools/shard_coco.py failed on {coco} ({split})")
    return out


def train_command(nproc: int, overrides: list[str]) -> list[str]:
    """``python -m ticod.train`` alone, or under the deepspeed launcher with ``nproc`` CPU ranks."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "ticod.train"]
    else:
        launcher = str(Path(sys.executable).parent / "deepspeed")
        cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(29500 + os.getpid() % 1000)]
        cmd += ["--module", "ticod.train"]
    return [*cmd, "--config", str(CONFIG), *overrides]


def overfit(
    coco: Path, work: Path, *, steps: int = 0, nproc: int = 2, extra: list[str] = ()
) -> dict[str, Any]:
    """Shard, train and evaluate; the final eval metrics, the steps and the time of the run."""
    shards = shard_sample(coco, work / "shards")
    run_dir = work / "run"
    overrides = [f"data.shards_dir={shards}", f"run_dir={run_dir}", "checkpoint.resume=''"]
    overrides += [f"max_steps={steps}"] if steps else []
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    log_path = work / "train.log"
    code = run_in_own_group(train_command(nproc, [*overrides, *extra]), log=log_path, env=env)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise RuntimeError(f"ticod.train exited {code}:\n{log_path.read_text()[-4000:]}")
    final = ck.list_checkpoints(run_dir)[-1]
    state = ck.read_trainer_state(final)
    done = state["train"]["step"]
    evals = sorted((run_dir / "eval").glob(f"step_{done:08d}/metrics.json"))
    if not evals:
        raise RuntimeError(f"the final evaluation wrote no metrics (see {log_path})")
    metrics = json.loads(evals[-1].read_text())
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {
        "steps": done,
        "global_batch": state["plan"]["global_batch"],
        "nproc": nproc,
        "wall_s": wall,
        "cpu_s": cpu,
        "train_wall_s": state["train"]["train_time_s"],
        "train_wall_s_per_step": state["train"]["train_time_s"] / done,
        "cpu_s_per_step": cpu / done,  # start-up and evaluation included: an upper bound
        "metrics": {k: metrics[k] for k in REPORTED if k in metrics},
        "overrides": [*overrides, *extra],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with workdir(args.work) as work:
        result = overfit(Path(args.coco), work, steps=args.steps, nproc=args.nproc, extra=list(args.set))
    report = Report("coco_overfit", torch.device("cpu"), vars(args), extra={"result": result})
    m = result["metrics"]
    rows = [Row(k, [v], "") for k, v in m.items()]
    rows += [
        Row("steps", [result["steps"]], f"x {result['global_batch']} images"),
        Row("wall", [result["wall_s"]], "s", note="whole run"),
        Row("CPU", [result["cpu_s"]], "s", note="whole run, all processes"),
        Row("wall per step", [result["train_wall_s_per_step"]], "s", note="training steps only"),
        Row("CPU per step", [result["cpu_s_per_step"]], "s", note="whole run / steps"),
    ]
    report.table(f"80 real COCO images, trained and evaluated on ({result['nproc']} rank(s))", rows)
    report.check(Target("box AP", m["AP"], AP_TARGET, higher_is_better=True))
    report.check(Target("caption BLEU-4", m["BLEU-4"], BLEU4_TARGET, higher_is_better=True))
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
