"""The model card of an export (``README.md``): what the model is, its training, data, metrics and licences.

Hugging Face model-card layout: YAML front matter (``library_name``, ``tags``, ``datasets``, ``metrics``,
``model-index``) over a Markdown body, so an export folder can be uploaded to the hub as it is.
:func:`ticod.export.export_checkpoint` writes it with the metrics known then (the newest
``RUN_DIR/eval/step_*/metrics.json``); training rewrites it after its final evaluation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ticod.config import Config, Task, load_config
from ticod.data.spec import data_manifests, source_names
from ticod.metrics.captioning import BERTSCORE_KEYS, COCO_CAPTION_KEYS
from ticod.metrics.detection import DETECTION_KEYS

CARD = "README.md"
SOURCE = "source.json"  # written by the export: the checkpoint, its step and samples seen
EVAL_DIR = "eval"
# The metrics.json keys a card reports, by model-index task, and their model-index metric types.
TASK_KEYS = {"object-detection": DETECTION_KEYS[:3], "image-to-text": COCO_CAPTION_KEYS + BERTSCORE_KEYS}
METRIC_TYPES = {"AP": "map", "AP50": "map@50", "AP75": "map@75", "METEOR": "meteor", "ROUGE-L": "rouge"}
METRIC_TYPES |= {"CIDEr": "cider", **{k: "bleu" for k in COCO_CAPTION_KEYS if k.startswith("BLEU")}}
METRIC_TYPES |= dict.fromkeys(BERTSCORE_KEYS, "bertscore")
COCO_LICENCE = (
    "if the data is MS-COCO: annotations © COCO Consortium, CC BY 4.0; images under the Flickr terms of use "
    "(https://cocodataset.org/#termsofuse)"
)
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


def latest_eval(run_dir: str | Path) -> tuple[int, dict[str, Any]] | None:
    """(step, metrics) of the newest ``RUN_DIR/eval/step_*/metrics.json``; None before any evaluation."""
    found = sorted((Path(run_dir) / EVAL_DIR).glob("step_*/metrics.json"))
    if not found:
        return None
    return int(found[-1].parent.name.removeprefix("step_")), json.loads(found[-1].read_text())


def write_model_card(export_dir: str | Path) -> Path:
    """(Re)write ``export_dir/README.md`` from the export, its run dir's evals and the shard manifests."""
    export_dir = Path(export_dir)
    source = json.loads((export_dir / SOURCE).read_text())
    run_dir = Path(source["checkpoint"]).parent.parent  # run_dir/checkpoints/step_X
    cfg = load_config(export_dir / "config.yaml")
    card = export_dir / CARD
    card.write_text(render_card(cfg, source, data_manifests(cfg.data), latest_eval(run_dir)))
    return card


def render_card(
    cfg: Config,
    source: dict[str, Any],
    manifests: dict[str, dict[str, Any] | str],
    evaluation: tuple[int, dict[str, Any]] | None,
) -> str:
    """The card's text: front matter and body."""
    name = Path(cfg.run_dir).name
    metrics = _numbers(evaluation[1]) if evaluation else {}
    dataset = dataset_name(cfg, manifests)
    front = {
        "library_name": "ticod",
        "pipeline_tag": "object-detection" if cfg.loss.task != Task.caption else "image-to-text",
        "tags": [
            "ticod",
            "object-detection",
            "image-captioning",
            "swin",
            "cascade-rcnn",
            "gpt2",
            "multitask",
        ],
        "datasets": [dataset],
        "metrics": sorted({METRIC_TYPES[k] for k in metrics if k in METRIC_TYPES}),
    }
    if evaluation and metrics:
        front["model-index"] = [_model_index(name, dataset, cfg.data.val_split, metrics)]
    body = [
        f"# {name}: TICOD ({_variant(cfg)})",
        "",
        _what(cfg),
        "",
        "## Training",
        "",
        *_table(_training(cfg, source)),
        "",
        "## Data",
        "",
        f"Shards of `{dataset}` (tools/shard_coco.py; manifests `<split>-manifest.json`):",
        "",
        *_data(manifests),
        "",
        "## Evaluation",
        "",
        *_evaluation(evaluation, metrics, cfg.data.val_split),
        "",
        "## Licences of the weights' sources",
        "",
        *_licences(cfg, manifests),
        "",
        "## Use",
        "",
        *_use(),
    ]
    return f"---\n{OmegaConf.to_yaml(front)}---\n\n" + "\n".join(body) + "\n"


def dataset_name(cfg: Config, manifests: dict[str, dict[str, Any] | str]) -> str:
    """The data's public name: a mix's source names joined by "+", else the name the train manifest records
    (tools/shard_coco.py --dataset), else the shards folder's name (its parent's where it is "shards")."""
    if cfg.data.sources:
        return "+".join(source_names(cfg.data))
    manifest = manifests.get(cfg.data.train_split) or manifests.get(cfg.data.val_split)
    if isinstance(manifest, dict) and manifest.get("dataset"):
        return str(manifest["dataset"])
    shards = Path(cfg.data.shards_dir).resolve()
    return shards.parent.name if shards.name == "shards" else shards.name


# Folder names that say nothing of the model in them (a pip package's model/, a hub cache's snapshot).
GENERIC_DIRS = {"model", "models", "snapshots", "weights", "checkpoint", "main"}


def public_model_name(name: str) -> str:
    """How a card names a model given by hub name or local folder, never by a local path.

    A hub name is kept. A folder is named by the hub cache's ``models--org--name``, else its README's
    one-word title (``# all-MiniLM-L6-v2``), else its config's ``_name_or_path`` where that is no path,
    else its own name (its parent's where the folder is a generic ``model/``).
    """
    path = Path(name).expanduser()
    if not (path.is_absolute() or name.startswith((".", "~")) or path.is_dir()):
        return name
    for part in reversed(path.parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    readme = path / "README.md"
    if readme.is_file():
        for line in readme.read_text(errors="ignore").splitlines():
            title = re.fullmatch(r"#\s+([\w./-]+)\s*", line)
            if title:
                return title.group(1)
    config = path / "config.json"
    if config.is_file():
        base = json.loads(config.read_text()).get("_name_or_path", "")
        if base and not Path(base).is_absolute() and not base.startswith((".", "~")):
            return str(base)
    named = [
        p for p in reversed(path.parts) if p not in GENERIC_DIRS and not re.fullmatch(r"[0-9a-f]{40}", p)
    ]
    return named[0] if named and named[0] != "/" else "a local model"


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v == v}


def _variant(cfg: Config) -> str:
    m = cfg.model
    cap = (
        public_model_name(m.captioner.name)
        if m.captioner.pretrained
        else f"GPT-2 {m.captioner.n_layer} layers x {m.captioner.n_embd}"
    )
    return f"{m.backbone.name} + Cascade R-CNN ({len(m.roi.iou_thresholds)} stages) + {cap}"


def _what(cfg: Config) -> str:
    heads = {
        Task.joint: "detects objects and captions images with one network",
        Task.detection: "detects objects (trained without the caption loss)",
        Task.caption: "captions images (trained without the detector)",
    }[cfg.loss.task]
    return (
        f"A TICOD model that {heads}: a Swin Transformer backbone (timm `{cfg.model.backbone.name}`) feeds an "
        f"FPN + RPN + Cascade R-CNN detector over {cfg.model.num_classes} classes and a GPT-2 decoder that "
        "cross-attends to the image features (after arXiv 2403.06292). Trained with L = L_det + λ·L_cap."
    )


def _training(cfg: Config, source: dict[str, Any]) -> list[tuple[str, str]]:
    data, ds = cfg.data, cfg.deepspeed
    lam = f"{cfg.loss.caption_weight}" if cfg.loss.balance.value == "fixed" else "learned (uncertainty)"
    return [
        ("task", cfg.loss.task.value),
        ("λ (caption loss weight)", lam),
        ("train image sizes", f"shorter side {list(data.train_min_sizes)}, longer side ≤ {data.max_size}"),
        ("eval image size", f"shorter side {data.test_min_size}, longer side ≤ {data.max_size}"),
        ("steps", str(source.get("step", "?"))),
        ("samples seen", str(source.get("samples", "?"))),
        ("global batch", str(source.get("global_batch", "?"))),
        ("precision", f"trained in {ds.precision.value} (ZeRO stage {ds.zero_stage})"),
        ("weights", f"{source.get('weights_dtype', '?')} safetensors"),
        ("seed", str(cfg.seed)),
    ]


def _data(manifests: dict[str, dict[str, Any] | str]) -> list[str]:
    rows = ["| split | images | boxes | captions | shards | source sha256 |", "|---|---|---|---|---|---|"]
    for split, m in manifests.items():
        if isinstance(m, str):
            rows.append(f"| {split} | manifest not found ({m.split(':')[0]}) | | | | |")
            continue
        sources = m.get("sources", {})
        sha = ", ".join(
            f"{k} `{v['sha256']}`" for k, v in sources.items() if isinstance(v, dict) and "sha256" in v
        )
        rows.append(
            f"| {split} | {m['total_samples']} | {m.get('num_boxes', '?')} | {m.get('num_captions', '?')} "
            f"| {len(m['shards'])} | {sha or 'not recorded'} |"
        )
    return rows


def _evaluation(
    evaluation: tuple[int, dict[str, Any]] | None, metrics: dict[str, float], split: str
) -> list[str]:
    if evaluation is None:
        return ["Not evaluated yet (`ticod-eval --checkpoint <this folder>`)."]
    n = metrics.get("num_images")
    lines = [f"Split `{split}` ({int(n) if n is not None else '?'} images), at step {evaluation[0]}:", ""]
    rows = [(k, f"{metrics[k]:.4f}") for keys in TASK_KEYS.values() for k in keys if k in metrics]
    bert = evaluation[1].get("bertscore")
    if isinstance(bert, dict) and "model" in bert:
        model = public_model_name(str(bert["model"]))
        rows.append(("BERTScore model", f"{model} (layer {bert.get('num_layers', '?')})"))
    return lines + _table(rows)


def _licences(cfg: Config, manifests: dict[str, dict[str, Any] | str]) -> list[str]:
    bb, cap = cfg.model.backbone, cfg.model.captioner
    if bb.checkpoint_path:
        backbone = (
            f"initialised from the file `{Path(bb.checkpoint_path).name}`: licence as its source states"
        )
    elif bb.pretrained:
        backbone = (
            f"initialised from timm's `{bb.name}` weights: {_timm_licence(bb.name)} (timm's pretrained_cfg)"
        )
    else:
        backbone = "random init"
    if cap.pretrained and cap.name.removeprefix("openai-community/") in GPT2_NAMES:
        card = f"openai-community/{cap.name.removeprefix('openai-community/')}"
        captioner = f"initialised from `{cap.name}` (OpenAI's GPT-2): MIT (the {card} model card)"
    elif cap.pretrained:
        captioner = f"initialised from `{public_model_name(cap.name)}`: licence as its model card states"
    else:
        captioner = "random init"
    described = [
        f"{split}: {', '.join(Path(v['path']).name for v in m.get('sources', {}).values() if isinstance(v, dict))}"
        for split, m in manifests.items()
        if isinstance(m, dict)
    ]
    return [
        f"- Backbone: {backbone}.",
        f"- Caption decoder: {captioner}.",
        f"- Training data ({'; '.join(described) or 'manifests not found'}): {COCO_LICENCE}.",
        "- TICOD code: Apache-2.0.",
    ]


def _timm_licence(name: str) -> str:
    import timm

    try:
        return str(timm.get_pretrained_cfg(name).license or "not stated")
    except (RuntimeError, AttributeError):
        return "not stated"


def _model_index(name: str, dataset: str, split: str, metrics: dict[str, float]) -> dict[str, Any]:
    results = []
    for task, keys in TASK_KEYS.items():
        found = [
            {"type": METRIC_TYPES[k], "name": k, "value": round(metrics[k], 4)} for k in keys if k in metrics
        ]
        if found:
            data = {"name": dataset, "type": dataset, "split": split}
            results.append({"task": {"type": task}, "dataset": data, "metrics": found})
    return {"name": name, "results": results}


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _use() -> list[str]:
    return [
        "```bash",
        "pip install ./ticod   # a clone of the TICOD repository",
        "ticod-predict --checkpoint <this folder> image.jpg images_dir/ --out predictions/",
        "ticod-eval --checkpoint <this folder> --data <shards dir> --split val",
        "```",
        "",
        "```python",
        "from ticod.export import load_for_inference",
        "",
        'bundle = load_for_inference("<this folder>")  # model (eval mode), config, tokenizer, categories',
        "```",
        "",
        "Files: `model.safetensors` (weights), `config.yaml` (the resolved training config), `categories.json`,",
        "`tokenizer/`, `source.json` (the checkpoint it came from).",
    ]
