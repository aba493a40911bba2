"""Host syncs per optimizer step of ``ticod.train``: the reads of tensor values that make the host wait.

``python tools/bench/syncs.py [--steps 12] [--log-every 4] [--grad-accum 1] [--zero-stage 2]``

On a GPU every read of a tensor's value on the host (``.item()``, ``float()``, ``int()``, ``bool()``,
``.tolist()``, ``.numpy()``) drains the device queue. This counts them on CPU, where the same Python calls
happen: the ``torch.Tensor`` methods are wrapped in counters, and :func:`ticod.train.main` runs the demo
model in this process (``configs/demo.yaml`` on generated demo shards, evaluation and checkpoints off).
Each read is charged to the micro-batch in flight (from one ``forward_backward`` call to the next, so a
log step's reduction counts for its step) and to the code that made it: the first frame outside torch
itself (``loop``: ticod/train.py, its log window ticod/train_metrics.py, ticod/preemption.py and the
collectives of ticod/distributed.py; ``model``: ticod/models, torchvision;
``deepspeed``). Reads inside torch's C++ (e.g. ``nonzero``) are not Python calls and not counted.

Not timed: the counts are exact and repeatable; ``--repeats`` is ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import Report, Row, Target, add_common_args, make_demo_data, setup, workdir

import ticod.train as train_mod

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
TORCH_DIR = str(Path(torch.__file__).parent)
TARGET = 2  # loop syncs per optimizer step outside log steps (issue 14)
LOOP_FILES = ("ticod/train.py", "ticod/train_metrics.py", "ticod/preemption.py", "ticod/distributed.py")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/syncs.json")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps")
    p.add_argument("--log-every", type=int, default=4, help="logging.log_every")
    p.add_argument("--grad-accum", type=int, default=1, help="optim.grad_accum")
    p.add_argument("--zero-stage", type=int, default=2, help="deepspeed.zero_stage")
    return p.parse_args(argv)


def origin(frame: Any) -> tuple[str, str]:
    """Who made the read: (package, file:line) of the first frame outside torch's own Python code."""
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    path = frame.f_code.co_filename if frame is not None else "?"
    site = "/".join(Path(path).parts[-2:]) + (f":{frame.f_lineno}" if frame is not None else "")
    if path.endswith(LOOP_FILES):
        return "loop", site
    if "/ticod/models/" in path or "/torchvision/" in path:
        return "model", site
    if "/deepspeed/" in path:
        return "deepspeed", site
    return "other: " + "/".join(Path(path).parts[-2:]), site


class SyncCounter:
    """Counts host reads of tensor values per micro-batch and origin while installed."""

    def __init__(self) -> None:
        self.micro: list[dict[str, Any]] = []  # per micro-batch: {"log": bool, "reads": Counter}
        self.sites: Counter[str] = Counter()  # file:line of every counted read
        self.active = False

    def _wrap(self, name: str) -> Any:
        original = getattr(torch.Tensor, name)
        counter = self

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter.active and counter.micro:
                package, site = origin(sys._getframe(1))
                counter.micro[-1]["reads"][package] += 1
                counter.sites[f"{package}: {site}"] += 1
            return original(self, *args, **kwargs)

        return original, read

    @contextlib.contextmanager
    def installed(self) -> Iterator[SyncCounter]:
        wrapped = {name: self._wrap(name) for name in READS}
        forward_backward, finish = train_mod.forward_backward, train_mod.finish

        def counted_forward_backward(run: Any, batch: Any, log_now: bool, *args: Any) -> Any:
            self.active = True
            self.micro.append({"log": log_now, "reads": Counter()})
            return forward_backward(run, batch, log_now, *args)

        def uncounted_finish(run: Any) -> None:
            self.active = False  # the final checkpoint and export are not steps
            finish(run)

        for name, (_, read) in wrapped.items():
            setattr(torch.Tensor, name, read)
        train_mod.forward_backward, train_mod.finish = counted_forward_backward, uncounted_finish
        try:
            yield self
        finally:
            for name, (original, _) in wrapped.items():
                setattr(torch.Tensor, name, original)
            train_mod.forward_backward, train_mod.finish = forward_backward, finish


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    report = Report("syncs", device, vars(args))
    with workdir() as tmp:
        _, shards = make_demo_data(tmp, 24)
        overrides = [
            f"run_dir={tmp / 'run'}",
            f"data.shards_dir={shards}",
            f"data.tokenizer={shards / 'tokenizer'}",
            "data.num_workers=1",
            "data.batch_size=2",
            f"max_steps={args.steps}",
            f"logging.log_every={args.log_every}",
            f"optim.grad_accum={args.grad_accum}",
            f"deepspeed.zero_stage={args.zero_stage}",
            "eval.at_start=false",
            "eval.at_end=false",
            "eval.every=0",
            "checkpoint.save_every=0",
            "optim.warmup_steps=1",
            *args.set,
        ]
        counter = SyncCounter()
        with counter.installed():
            code = train_mod.main(["--config", args.config, *overrides])
        if code != 0:
            raise SystemExit(f"ticod.train exited with {code}")
    # Optimizer steps: grad_accum micro-batches each; a step is a log step when its last micro-batch is.
    micro, accum = counter.micro, args.grad_accum
    steps = [micro[i : i + accum] for i in range(0, len(micro), accum)]
    origins = sorted({o for m in micro for o in m["reads"]})
    rows: list[Row] = []
    per_step: dict[str, dict[str, list[float]]] = {}
    for kind, chosen in (("steps without a log line", False), ("log steps", True)):
        picked = [s for s in steps if s[-1]["log"] == chosen]
        if not picked:
            continue
        for o in ["all", *origins]:
            values = [
                float(sum(sum(m["reads"].values()) if o == "all" else m["reads"][o] for m in s))
                for s in picked
            ]
            per_step.setdefault(kind, {})[o] = values
            rows.append(Row(f"{kind}: {o}", values, "syncs/step", note=f"{len(picked)} steps"))
    report.table(f"Host syncs per optimizer step (grad_accum {accum}, ZeRO-{args.zero_stage}, CPU)", rows)
    loop = per_step["steps without a log line"].get("loop", [0.0])
    report.check(Target("loop syncs per step outside log steps (max)", max(loop), TARGET, False))
    print("reads by call site, whole run (steps x count):")
    for site, n in counter.sites.most_common():
        print(f"  {n:4d}  {site}")
    report.extra["sites"] = dict(counter.sites.most_common())
    report.extra["median_all_outside_log_steps"] = statistics.median(
        per_step["steps without a log line"]["all"]
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
