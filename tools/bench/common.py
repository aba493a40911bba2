"""Shared parts of the ``tools/bench/*.py`` benchmarks: machine facts, alternating timing, peak memory,
FLOP counting, result tables and JSON, and the demo inputs (tools/make_demo_coco.py + shards).

Every benchmark runs both sides in one process, alternating them round by round (the order rotates each
round, so neither side always runs on a warmer cache or a quieter machine), after warm-up calls, and
reports median / min / max over the rounds plus the ratio of the medians. On a shared machine the ratio
of medians is the number to read; absolute times move with the load of the other users.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[1:1] = [str(ROOT), str(ROOT / "tools")]  # run as a script from a checkout (ticod, make_demo_coco)

from ticod.config import Config, Precision, load_config  # noqa: E402

if TYPE_CHECKING:
    from ticod.data.samples import Batch

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
COCO_SAMPLE = ROOT.parent / "shared" / "coco_sample"  # 80 real COCO train2017 images (the team's share)
GPT2_VOCAB = 50257  # the hub GPT-2 BPE; used for model sizes when the config names it (no download)
GPT2_POSITIONS = 1024
# Dense bf16 tensor-core peaks (FLOP/s) used for MFU; pass --peak-tflops for anything else.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


# ------------------------------------------------------------------------------------ machine
def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (goes into every result JSON)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (device work included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(
    sides: dict[str, Callable[[], float]], *, repeats: int, warmup: int, log: bool = True
) -> dict[str, list[float]]:
    """Call each side ``warmup`` times, then ``repeats`` rounds of one call per side; the values they return.

    A side returns its own measurement (seconds, or a rate), so it can leave set-up out of it. The order
    of the sides rotates by one each round.
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            values[name].append(float(sides[name]()))
        if log:
            print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {values[n][-1]:.4g}" for n in names))
    return values


@dataclass
class Row:
    """One line of a result table: a measured quantity over rounds and its ratio to a reference row."""

    name: str
    values: list[float]
    unit: str
    ratio_to: str = ""  # name of the reference row ("" = none)
    note: str = ""
    ratio: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "n": len(self.values),
            "values": self.values,
            "ratio": self.ratio,
            "ratio_to": self.ratio_to or None,
            "note": self.note,
        }


def fill_ratios(rows: Sequence[Row]) -> None:
    by_name = {r.name: r for r in rows}
    for r in rows:
        if r.ratio_to:
            r.ratio = r.median / by_name[r.ratio_to].median


def format_table(title: str, rows: Sequence[Row]) -> str:
    """A fixed-width table (also valid Markdown) of median / min / max and ratio of medians."""
    fill_ratios(rows)
    head = ["", "median", "min", "max", "unit", "ratio", "note"]
    body = []
    for r in rows:
        ratio = f"{r.ratio:.3f} × {r.ratio_to}" if r.ratio is not None else ""
        body.append([r.name, _g(r.median), _g(min(r.values)), _g(max(r.values)), r.unit, ratio, r.note])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"**{title}**", "", line(head), sep, *(line(b) for b in body)])


def _g(x: float) -> str:
    return f"{x:.4g}"


@dataclass
class Target:
    """A pass/fail check of a measured value against the issue's threshold."""

    name: str
    value: float
    threshold: float
    higher_is_better: bool
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def text(self) -> str:
        op = "≥" if self.higher_is_better else "≤"
        verdict = "PASS" if self.passed else "FAIL"
        note = f" ({self.note})" if self.note else ""
        return f"{verdict}  {self.name}: {self.value:.4g} {op} {self.threshold:.4g}{note}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "op": ">=" if self.higher_is_better else "<=",
            "passed": self.passed,
            "note": self.note,
        }


@dataclass
class Report:
    """Tables, targets and extra facts of one benchmark run; printed and written as JSON."""

    bench: str
    device: torch.device
    args: dict[str, Any]
    tables: dict[str, list[Row]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self, title: str, rows: list[Row]) -> None:
        self.tables[title] = rows
        print("\n" + format_table(title, rows))

    def check(self, target: Target) -> None:
        self.targets.append(target)

    def finish(self, out: str | Path) -> dict[str, Any]:
        machine = machine_info(self.device)
        print(
            f"\nmachine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {self.device}"
        )
        if self.targets:
            print("targets:")
            for t in self.targets:
                print("  " + t.text())
        payload = {
            "bench": self.bench,
            "machine": machine,
            "args": self.args,
            "tables": {k: [r.as_dict() for r in rows] for k, rows in self.tables.items()},
            "markdown": "\n\n".join(format_table(k, rows) for k, rows in self.tables.items()),
            "targets": [t.as_dict() for t in self.targets],
            **self.extra,
        }
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {path}")
        return payload


# ------------------------------------------------------------------------------------- memory
def _cpu_allocations(prof: torch.profiler.profile) -> list[tuple[int, int]]:
    """(time ns, +bytes allocated / -bytes freed) of every CPU tensor allocation the profiler saw."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, int(node.typed[1].alloc_size)))
        stack.extend(node.children)
    events.sort()
    return events


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """``fn()``'s result and the peak of tensor memory it added above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at the start. CPU: the same quantity
    from the allocation events of torch's profiler (every CPU tensor allocation and free, in time order),
    so it counts tensor bytes exactly like the CUDA allocator statistics do, unaffected by malloc caching
    or by the interpreter's own memory (which a process RSS would include).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        sync(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for _, size in _cpu_allocations(prof):
        live += size
        peak = max(peak, live)
    return result, peak


# -------------------------------------------------------------------------------------- flops
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn`` by ``torch.utils.flop_counter`` (matmul/conv/attention: 2 × multiply-adds)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """Dense bf16 peak FLOP/s of the GPU (from its name), or ``override_tflops``; 0 when unknown (CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)


# -------------------------------------------------------------------------------- common flags
def add_common_args(p: argparse.ArgumentParser, *, default_out: str) -> None:
    p.add_argument("--config", default=str(DEMO_CONFIG), help="model/data config (default: the CPU demo)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default="", help="autocast dtype (default: the config's)"
    )
    p.add_argument("--image-size", default="", metavar="WxH", help="resize so images are at most WxH")
    p.add_argument("--batch-size", type=int, default=0, help="images per step (default: the config's)")
    p.add_argument("--data", default="", help="shards dir with tokenizer/ (default: make demo data)")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (not measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1: on a shared machine more threads than free cores "
        "stall in OpenMP barriers and make timings erratic; 0 = torch's default)",
    )
    p.add_argument("--out", default=default_out, help="result JSON")


def add_coco_arg(p: argparse.ArgumentParser) -> None:
    """``--coco``: a COCO train2017 sample (``images/``, ``instances_train2017.json``, ``captions_train2017.json``)."""
    p.add_argument("--coco", default=str(COCO_SAMPLE), help="COCO train2017 sample (default: %(default)s)")


def setup(args: argparse.Namespace) -> torch.device:
    """The benchmark device; on CPU also the thread count from ``--threads``."""
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    return device


def bench_config(args: argparse.Namespace, shards_dir: str | Path, *extra: str) -> Config:
    """The config of a benchmark run: ``--config`` + ``--set``, offline (no weight downloads), sized.

    Pretrained weights are switched off (random init costs the same time and memory); a pretrained GPT-2
    keeps its hub sizes (1024 positions). ``--image-size WxH`` makes the short side H and caps the long
    side at W, as the paper's 1333×800.
    """
    overrides = [
        f"data.shards_dir={shards_dir}",
        "model.backbone.pretrained=false",
        "model.backbone.checkpoint_path=''",
        "model.captioner.pretrained=false",
        "data.num_workers=0",
    ]
    base = load_config(args.config, list(args.set))
    if base.model.captioner.pretrained:
        overrides.append(f"model.captioner.n_positions={GPT2_POSITIONS}")
    if args.image_size:
        w, h = (int(v) for v in args.image_size.lower().split("x"))
        overrides += [f"data.train_min_sizes=[{min(w, h)}]", f"data.test_min_size={min(w, h)}"]
        overrides.append(f"data.max_size={max(w, h)}")
    if args.batch_size:
        overrides += [f"data.batch_size={args.batch_size}", f"data.eval_batch_size={args.batch_size}"]
    if args.precision:
        overrides.append(f"deepspeed.precision={args.precision}")
    return load_config(args.config, [*overrides, *args.set, *extra])


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast with fp32 weights (what ticod/engine.py configures DeepSpeed to do), else nothing."""
    if cfg.deepspeed.precision == Precision.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- demo inputs
@contextlib.contextmanager
def workdir(keep: str = "") -> Iterator[Path]:
    """A temporary directory for generated data (or ``keep`` when given, left in place)."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="ticod-bench-") as tmp:
        yield Path(tmp)


def run_in_own_group(
    cmd: list[str], *, log: Path, env: dict[str, str] | None = None, timeout: float | None = None
) -> int:
    """Run ``cmd`` (a launcher, say) with its output in ``log``, in a session of its own; its exit status.

    The whole process group is SIGKILLed on the way out, also on a timeout or an interrupt (a pytest
    timeout, Ctrl-C): killing the launcher alone leaves its ranks training on, orphaned.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):  # ranks and workers the launcher left behind
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_demo_data(
    root: Path,
    n_train: int,
    *,
    min_size: int = 96,
    max_size: int = 192,
    per_shard: int = 100,
    seed: int = 0,
    vocab: int = 400,
) -> tuple[Path, Path]:
    """Demo COCO (tools/make_demo_coco.py) and its train shards + BPE tokenizer; (coco dir, shards dir)."""
    from make_demo_coco import make_demo_coco

    from ticod.data.coco import load_records
    from ticod.data.shards import write_shards
    from ticod.data.tokenizer import train_caption_tokenizer

    coco, shards = root / "coco", root / "shards"
    t = time.perf_counter()
    make_demo_coco(coco, n_train, 1, seed, min_size, max_size)
    ann = coco / "annotations"
    records, categories = load_records(ann / "instances_train.json", ann / "captions_train.json")
    write_shards(
        records, categories, coco / "train", shards, "train", samples_per_shard=per_shard, progress=False
    )
    train_caption_tokenizer([c for r in records for c in r["captions"]], shards / "tokenizer", vocab)
    print(
        f"demo data: {n_train} images {min_size}-{max_size} px in {time.perf_counter() - t:.1f} s -> {root}"
    )
    return coco, shards


def model_vocab(cfg: Config, tokenizer: Any) -> int:
    """Vocabulary of the benchmarked model: GPT-2's when the config uses GPT-2, so the LM head costs
    what it will in training (the demo tokenizer's ids all fit in it); the tokenizer's otherwise."""
    if cfg.model.captioner.pretrained or cfg.data.tokenizer == "gpt2":
        return max(GPT2_VOCAB, len(tokenizer))
    return len(tokenizer)


def fixed_batches(cfg: Config, tokenizer: Any, n: int, seed: int = 0) -> list[Batch]:
    """The first ``n`` training batches of the shards (same for every side of a benchmark)."""
    from ticod.data.train_stream import build_train_loader

    loader = build_train_loader(cfg.data, tokenizer, rank=0, world_size=1, seed=seed)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def mib(n: float) -> float:
    return n / 2**20
