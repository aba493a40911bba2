"""tools/ablate.py: arm configs, the table math, the report from run dirs, and a tiny study end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
from PIL import Image
from safetensors.numpy import save_file

from ticod.config import Balance, ConfigError, Task, load_config, to_yaml
from ticod.metrics.captioning import BERTSCORE_KEYS, COCO_CAPTION_KEYS

ROOT = Path(__file__).resolve().parents[1]
ablate = load_tool("ablate")
plot_ablation = load_tool("plot_ablation")


# ------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("kind", "task", "balance"),
    [
        ("caption_only", Task.caption, Balance.fixed),
        ("detection_only", Task.detection, Balance.fixed),
        ("joint", Task.joint, Balance.fixed),
        ("uncertainty", Task.joint, Balance.uncertainty),
    ],
)
def test_arm_configs_load_alone_over_demo(kind, task, balance):
    cfg = load_config(ROOT / "configs" / "ablation" / f"{kind}.yaml")
    assert (cfg.loss.task, cfg.loss.balance) == (task, balance)
    assert cfg.model.num_classes == 6 and cfg.max_steps == 600  # demo.yaml underneath
    assert cfg.run_dir == f"runs/ablation/{kind}"


def test_arms_compose_over_another_base(tmp_path):
    base = ROOT / "configs" / "ticod_small.yaml"
    cap = load_config(ablate.compose_config("caption_only", base, tmp_path))
    assert cap.loss.task == Task.caption and not cap.model.captioner.use_fpn_levels
    assert cap.model.backbone.name == "swin_tiny_patch4_window7_224" and cap.model.num_classes == 80
    joint = load_config(ablate.compose_config("joint", base, tmp_path), ["loss.caption_weight=0.5"])
    assert joint.loss.caption_weight == 0.5 and joint.data.tokenizer == "gpt2"
    assert (tmp_path / "configs" / "joint.yaml").is_file()


def test_make_arms_orders_baselines_sweep_then_learned():
    arms = ablate.make_arms(list(ablate.KINDS), [0.5, 0.05, 0.2, 0.5])
    names = [a.name for a in arms]
    assert names == [
        "caption_only",
        "detection_only",
        "joint_lam0.05",
        "joint_lam0.2",
        "joint_lam0.5",
        "uncertainty",
    ]
    assert [a.name for a in ablate.make_arms(["uncertainty", "caption_only"], [0.1])] == [
        "caption_only",
        "uncertainty",
    ]


def test_plan_seed_major_overrides_and_refuses_a_changed_run_dir(tmp_path):
    argv = ["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "--seeds", "3", "4"]
    argv += ["--lambdas", "0.2", "--arms", "caption_only", "joint", "--max-steps", "60"]
    argv += ["--bertscore-model", "config", "optim.lr=0.002"]
    runs = ablate.plan_runs(ablate.parse_args(argv))
    assert [(r.arm.name, r.seed) for r in runs] == [
        ("caption_only", 3),
        ("joint_lam0.2", 3),
        ("caption_only", 4),
        ("joint_lam0.2", 4),
    ]
    joint = runs[1]
    assert joint.run_dir == tmp_path / "out" / "runs" / "joint_lam0.2" / "seed3"
    cfg = load_config(joint.config, joint.overrides)
    assert (cfg.seed, cfg.max_steps, cfg.loss.caption_weight, cfg.optim.lr) == (3, 60, 0.2, 0.002)
    assert cfg.checkpoint.resume == "auto" and cfg.data.shards_dir == str(tmp_path / "shards")
    assert joint.final_metrics == joint.run_dir / "eval" / "step_00000060" / "metrics.json"

    joint.run_dir.mkdir(parents=True)  # as ticod.train leaves it, but trained with another lr
    (joint.run_dir / "config.yaml").write_text(
        to_yaml(load_config(joint.config, [*joint.overrides, "optim.lr=0.1"]))
    )
    with pytest.raises(ConfigError, match="different config"):
        ablate.plan_runs(ablate.parse_args(argv))


def test_eval_at_end_is_required(tmp_path):
    argv = ["--data", "d", "--out", str(tmp_path), "--bertscore-model", "config", "eval.at_end=false"]
    assert ablate.main(argv) == 2


# ------------------------------------------------------------------------------------ table math
def test_mean_std_is_sample_std_of_finite_values():
    assert ablate.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert ablate.mean_std([0.25, 0.75, math.nan, None]) == {"mean": 0.5, "std": math.sqrt(0.125), "n": 2}
    one = ablate.mean_std([0.4])
    assert one["mean"] == 0.4 and math.isnan(one["std"]) and one["n"] == 1
    assert ablate.mean_std([])["n"] == 0


def test_fmt_scales_to_percent():
    assert ablate.fmt({"mean": 0.1234, "std": 0.01, "n": 2}) == "12.34 ± 1.00"
    assert ablate.fmt({"mean": 0.1234, "std": math.nan, "n": 1}) == "12.34"
    assert ablate.fmt({"mean": -0.005, "std": 0.001, "n": 2}, signed=True) == "-0.50 ± 0.10"
    assert ablate.fmt({"mean": 0.02, "std": 0.0, "n": 3}, signed=True) == "+2.00 ± 0.00"
    assert ablate.fmt({"mean": math.nan, "std": math.nan, "n": 0}) == "—"
    assert ablate.fmt(None) == "—"


def _arm(kind: str, lam: float | None, per_seed: dict[int, dict[str, float]]) -> dict:
    runs = [{"seed": s, "status": "done", "metrics": m} for s, m in per_seed.items()]
    return {"name": kind, "kind": kind, "lambda": lam, "runs": runs}


def test_paired_deltas_match_seeds_and_baselines():
    arms = [
        _arm("caption_only", None, {0: {"CIDEr": 0.5}, 1: {"CIDEr": 0.7}, 2: {"CIDEr": 0.9}}),
        _arm("detection_only", None, {0: {"AP": 0.30}, 1: {"AP": 0.20}}),
        # Seed 2 is missing from detection_only, seed 1 from this arm.
        _arm("joint", 0.2, {0: {"CIDEr": 0.6, "AP": 0.25}, 2: {"CIDEr": 0.8, "AP": 0.5}}),
    ]
    (row,) = ablate.paired_deltas(arms)
    cider, ap = row["deltas"]["CIDEr"], row["deltas"]["AP"]
    assert cider["n"] == 2 and cider["better"] == 1
    assert cider["mean"] == pytest.approx(0.0) and cider["std"] == pytest.approx(math.sqrt(0.02))
    assert ap["n"] == 1 and ap["mean"] == pytest.approx(-0.05) and ap["better"] == 0
    assert row["deltas"]["METEOR"]["n"] == 0  # no values: no difference


# ------------------------------------------------------------------------ report from run dirs
def _metrics(caption: bool, detection: bool, base: float) -> dict:
    """A metrics.json as ticod.evaluate writes it (extra keys included)."""
    m: dict = {"num_images": 8, "bad_samples": 0}
    if detection:
        m |= {"AP": base, "AP50": base + 0.2, "AP75": base / 2, "num_detections": 40}
    if caption:
        m |= {k: base + 0.01 * i for i, k in enumerate(COCO_CAPTION_KEYS)}
        m |= {k: 0.5 + base for k in BERTSCORE_KEYS}
        m["bertscore"] = {"model": "tiny-bert", "num_layers": 2, "rescale_with_baseline": False}
    return m


def test_report_from_finished_runs(tmp_path):
    out = tmp_path / "study"
    argv = ["--data", str(tmp_path), "--out", str(out), "--seeds", "0", "1", "--lambdas", "0.1", "0.5"]
    argv += ["--max-steps", "7", "--bertscore-model", "config", "--report-only", "optim.warmup_steps=1"]
    # Every arm and seed finished, except joint λ=0.5 seed 1 (so n = 1 there).
    base = {"caption_only": 0.10, "detection_only": 0.30, "joint_lam0.1": 0.20, "joint_lam0.5": 0.40}
    base["uncertainty"] = 0.05
    for name, b in base.items():
        for seed in (0, 1):
            if (name, seed) == ("joint_lam0.5", 1):
                continue
            run = out / "runs" / name / f"seed{seed}"
            (run / "eval" / "step_00000007").mkdir(parents=True)
            m = _metrics(name != "detection_only", name != "caption_only", b + 0.02 * seed)
            (run / "eval" / "step_00000007" / "metrics.json").write_text(json.dumps(m))
            if name in ("joint_lam0.1", "caption_only"):  # 3 different captions for 4, 1 for 20 images
                texts = ["a", "b", "a", "c"] if name == "joint_lam0.1" else ["x"] * 20
                caps = [{"image_id": i, "caption": c} for i, c in enumerate(texts)]
                (run / "eval" / "step_00000007" / "captions.json").write_text(json.dumps(caps))
            if name == "uncertainty":
                (run / "export").mkdir()
                s = {"loss_combiner.log_var_det": np.array([0.5 * seed], np.float32)}
                s["loss_combiner.log_var_cap"] = np.array([math.log(2.0)], np.float32)
                save_file(s, str(run / "export" / "model.safetensors"))

    assert ablate.main(argv) == 1  # one run is missing
    results = json.loads((out / "results.json").read_text())
    arms = {a["name"]: a for a in results["arms"]}
    assert list(arms) == ["caption_only", "detection_only", "joint_lam0.1", "joint_lam0.5", "uncertainty"]
    cider = arms["joint_lam0.1"]["summary"]["CIDEr"]  # 0.20 + 0.06 (CIDEr's offset) + 0.02 * seed
    assert (
        cider["mean"] == pytest.approx(0.27)
        and cider["std"] == pytest.approx(0.02 / math.sqrt(2))
        and cider["n"] == 2
    )
    assert arms["joint_lam0.5"]["summary"]["AP"]["n"] == 1
    assert "AP" not in arms["caption_only"]["summary"] and "CIDEr" not in arms["detection_only"]["summary"]
    learned = arms["uncertainty"]["runs"][1]["learned"]
    assert learned["w_det"] == pytest.approx(math.exp(-0.5)) and learned["w_cap"] == pytest.approx(0.5)
    assert learned["lambda"] == pytest.approx(0.5 / math.exp(-0.5), rel=1e-6)
    paired = {r["name"]: r["deltas"] for r in results["paired"]}
    assert paired["joint_lam0.1"]["BLEU-4"]["mean"] == pytest.approx(0.10)  # 0.23 - 0.13 on both seeds
    assert paired["joint_lam0.1"]["AP"]["mean"] == pytest.approx(-0.10)
    assert paired["joint_lam0.1"]["BLEU-4"]["better"] == 2 and paired["joint_lam0.1"]["AP"]["better"] == 0

    md = (out / "RESULTS.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| joint_lam0.1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # arm, λ, BLEU-4, METEOR, ROUGE-L, CIDEr, BERTScore F1, box AP, AP50, distinct captions, n
    assert cells[:2] == ["joint_lam0.1", "0.1"] and cells[-1] == "2"
    assert cells[2] == "24.00 ± 1.41" and cells[5] == "27.00 ± 1.41" and cells[6] == "71.00 ± 1.41"
    assert cells[7] == "21.00 ± 1.41" and cells[8] == "41.00 ± 1.41" and cells[9] == "75.00 ± 0.00"
    assert "| caption_only | — | 14.00 ± 1.41 |" in md and "| joint_lam0.5 | 0.5 | 43.00 |" in md
    assert "| 1 | 0.607 | 0.500 | 0.824 |" in md  # learned weights of uncertainty seed 1
    assert "**Warning**: caption_only give(s)" in md  # 5% distinct captions; joint_lam0.1 has 75%
    reading = md.split("The other captioning arms (")[1].split(")")[0].split(", ")
    assert "joint_lam0.1" in reading and "caption_only" not in reading and "detection_only" not in reading
    assert "tiny-bert (layer 2" in md and "joint_lam0.5 seed 1 (missing)" in md
    with Image.open(out / "results.png") as png:
        assert png.format == "PNG" and png.size == (1600, 750)


def test_plot_draws_the_sweep_and_reference_lines():
    def arm(kind, lam, mean, std):
        return {"kind": kind, "lambda": lam, "summary": {"CIDEr": {"mean": mean, "std": std, "n": 2}}}

    results = {
        "caption_metrics": ["CIDEr"],
        "detection_metrics": [],
        "data": "d",
        "max_steps": 1,
        "seeds": [0],
    }
    results["arms"] = [
        arm("caption_only", None, 0.5, 0.1),
        arm("joint", 0.1, 0.6, 0.05),
        arm("joint", 0.5, 0.4, 0.0),
        arm("uncertainty", None, 0.55, math.nan),
    ]
    fig = plot_ablation.draw_figure(results)
    ax = fig.axes[0]
    sweep = ax.containers[0]  # the error bars of the λ sweep
    assert list(sweep.lines[0].get_xdata()) == [0.1, 0.5]
    assert list(sweep.lines[0].get_ydata()) == pytest.approx([60.0, 40.0])
    refs = {line.get_label(): line.get_ydata()[0] for line in ax.lines if line.get_label() != "_nolegend_"}
    assert refs["caption only"] == pytest.approx(50.0) and refs["learned weights"] == pytest.approx(55.0)
    assert ax.get_title() == "CIDEr ×100" and ax.get_xscale() == "log"


# ----------------------------------------------------------------------------------- end to end
def _run_ablate(argv: list[str]) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "ablate.py"), *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_study_end_to_end(demo_shards_dir, tmp_path):
    out = tmp_path / "study"
    argv = ["--data", str(demo_shards_dir), "--out", str(out), "--seeds", "0", "--jobs", "2"]
    argv += ["--arms", "caption_only", "joint", "--lambdas", "0.5", "--max-steps", "2"]
    argv += ["optim.warmup_steps=1", "data.batch_size=2", "eval.max_images=4", "checkpoint.save_every=0"]
    argv += ["logging.log_every=1"]
    proc = _run_ablate(argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    md = (out / "RESULTS.md").read_text()
    assert "all-MiniLM-L6-v2" in md or "minilm" in md.lower()  # the offline BERTScore default
    for arm in results["arms"]:
        (run,) = arm["runs"]
        written = json.loads((Path(run["run_dir"]) / "eval" / "step_00000002" / "metrics.json").read_text())
        assert run["status"] == "done" and run["wall_s"] > 0
        for metric in set(ablate.METRICS) & set(arm["summary"]):
            stats = arm["summary"][metric]
            assert stats["n"] == 1 and stats["mean"] == written[metric], (arm["name"], metric)
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm['name']} |"))
        assert f"| {100 * written['ROUGE-L']:.2f} |" in row
        captions = json.loads((Path(run["run_dir"]) / "eval" / "step_00000002" / "captions.json").read_text())
        assert len(captions) == 4
        assert run["metrics"]["distinct"] == len({c["caption"] for c in captions}) / 4
    assert [a["name"] for a in results["arms"]] == ["caption_only", "joint_lam0.5"]
    assert set(results["arms"][1]["summary"]) == {*ablate.METRICS, "distinct"}
    with Image.open(out / "results.png") as png:
        assert png.size == (1600, 750)

    # Again: both runs finished, nothing is trained (the train logs stay as they were).
    log = out / "runs" / "joint_lam0.5" / "seed0" / "train_log.jsonl"
    before = log.read_text()
    again = _run_ablate(argv)
    assert again.returncode == 0 and again.stdout.count("finished already, skipped") == 2
    assert log.read_text() == before
    # Another setting with the same --out would mix configs: refused before any training.
    changed = _run_ablate([*argv, "optim.lr=0.01"])
    assert changed.returncode == 2 and "different config" in changed.stderr


@pytest.mark.slow
def test_uncertainty_arm_trains_and_reports_learned_weights(demo_shards_dir, tmp_path):
    out = tmp_path / "study"
    argv = ["--data", str(demo_shards_dir), "--out", str(out), "--seeds", "0", "--arms", "uncertainty"]
    argv += ["--max-steps", "2", "--bertscore-model", "config", "optim.warmup_steps=1", "data.batch_size=2"]
    argv += ["eval.max_images=4", "checkpoint.save_every=0", "logging.log_every=1"]
    proc = _run_ablate(argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    (arm,) = json.loads((out / "results.json").read_text())["arms"]
    (run,) = arm["runs"]
    learned = run["learned"]
    # Two small Adam steps from s = 0: the weights moved, but only a little.
    assert 0 < abs(learned["s_det"]) < 0.01 and 0 < abs(learned["s_cap"]) < 0.01
    assert learned["w_det"] == pytest.approx(math.exp(-learned["s_det"]))
    assert learned["lambda"] == pytest.approx(learned["w_cap"] / learned["w_det"])
    md = (out / "RESULTS.md").read_text()
    assert f"| 0 | {learned['w_det']:.3f} | {learned['w_cap']:.3f} | {learned['lambda']:.3f} |" in md
    assert set(arm["summary"]) >= {*ablate.METRICS, "learned_lambda"}
