"""Export a training checkpoint to ``model.safetensors`` + config + tokenizer, and load it back.

``ticod-export`` / ``python -m ticod.export --checkpoint RUN_DIR_OR_CHECKPOINT --out DIR``. The export is
what ``ticod.predict`` and ``ticod.evaluate`` load: safetensors weights (no pickle), the resolved config,
the category list and the tokenizer, with a model card (``README.md``, Hugging Face layout). They also
accept a run dir (its ``export/``, else its latest checkpoint) or a checkpoint dir, consolidated on the fly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from ticod import checkpoint as ckpt_lib
from ticod.config import Config, load_config
from ticod.factory import build_model
from ticod.model_card import SOURCE, write_model_card
from ticod.models import TICOD

WEIGHTS = "model.safetensors"


@dataclass
class InferenceBundle:
    """A model ready for eval plus what is needed to read its outputs."""

    model: TICOD
    cfg: Config
    tokenizer: object
    categories: list[dict]


def _run_dir_of(checkpoint_dir: Path) -> Path:
    return checkpoint_dir.parent.parent  # run_dir/checkpoints/step_X


def _load_run_files(directory: Path, overrides: list[str] | None = None):
    from ticod.data.tokenizer import load_tokenizer

    cfg = load_config(directory / "config.yaml", overrides)
    categories = json.loads((directory / "categories.json").read_text())
    tokenizer = load_tokenizer(str(directory / "tokenizer"))
    return cfg, categories, tokenizer


def _load_consolidated(model: TICOD, ckpt: Path) -> None:
    from ticod.engine import consolidated_state_dict

    missing, unexpected = model.load_state_dict(consolidated_state_dict(ckpt), strict=False)
    # GPT-2 ties lm_head to wte, which some consolidations list under one name only.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt} does not match the model: missing={missing} unexpected={unexpected}"
        )


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Consolidate one (ZeRO) checkpoint into a DeepSpeed-free export dir with its model card."""
    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    run_dir = _run_dir_of(ckpt)
    cfg, categories, tokenizer = _load_run_files(run_dir)
    model = build_model(cfg, tokenizer)
    _load_consolidated(model, ckpt)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt_lib.write_run_files(
        tmp, ckpt_lib.RunFiles((run_dir / "config.yaml").read_text(), categories, tokenizer)
    )
    save_model(model, str(tmp / WEIGHTS))  # drops tied duplicates; load_model restores them
    state = json.loads((ckpt / ckpt_lib.STATE_FILE).read_text())
    source = {
        "checkpoint": str(ckpt.resolve()),
        "step": state["train"]["step"],
        "samples": state["train"]["samples"],
        "global_batch": state.get("plan", {}).get("global_batch"),
        "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    (tmp / SOURCE).write_text(json.dumps(source, indent=2))
    write_model_card(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_for_inference(
    path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None
) -> InferenceBundle:
    """Load an export dir, a run dir or a checkpoint dir as an eval-mode model on ``device``."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        cfg, categories, tokenizer = _load_run_files(path, overrides)
        model = build_model(cfg, tokenizer)
        load_model(model, str(path / WEIGHTS), device="cpu")
    else:
        if (path / "export" / WEIGHTS).is_file():
            return load_for_inference(path / "export", device, overrides)
        ckpt = ckpt_lib.latest_checkpoint(path) if (path / ckpt_lib.CKPT_DIR).is_dir() else path
        if ckpt is None or not (ckpt / ckpt_lib.STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: no export ({WEIGHTS}), run dir or complete checkpoint here")
        cfg, categories, tokenizer = _load_run_files(_run_dir_of(ckpt), overrides)
        model = build_model(cfg, tokenizer)
        _load_consolidated(model, ckpt)
    return InferenceBundle(model.to(device).eval(), cfg, tokenizer, categories)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir (latest checkpoint) or checkpoint dir")
    p.add_argument("--out", required=True, help="export dir to write")
    args = p.parse_args(argv)
    src = Path(args.checkpoint)
    ckpt = ckpt_lib.latest_checkpoint(src) if (src / ckpt_lib.CKPT_DIR).is_dir() else src
    if ckpt is None:
        print(f"error: no complete checkpoint under {src}", file=sys.stderr)
        return 2
    print(export_checkpoint(ckpt, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
