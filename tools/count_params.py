"""Print TICOD's parameter counts per part for one or more configs, without downloading anything.

``python tools/count_params.py [CONFIG ...] [--set key=value ...]`` (default: configs/ticod_small.yaml
and configs/ticod_large.yaml). The model is built on the ``meta`` device (shapes only, no memory, no
weights): pretrained loading is switched off and, for a pretrained GPT-2, its hub sizes are used (GPT-2
small: 12 layers, 12 heads, width 768, 1024 positions, the 50257-token BPE vocabulary).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from ticod.config import load_config  # noqa: E402
from ticod.models import TICOD  # noqa: E402

DEFAULT_CONFIGS = [ROOT / "configs" / "ticod_small.yaml", ROOT / "configs" / "ticod_large.yaml"]
GPT2_VOCAB = 50257
GPT2_POSITIONS = 1024  # n_positions of the hub GPT-2 checkpoints


def build_on_meta(
    config: str | Path, overrides: list[str] | None = None, vocab_size: int = GPT2_VOCAB
) -> TICOD:
    """The model of ``config`` with shapes only: no download, no memory."""
    cfg = load_config(config, list(overrides or []))
    offline = [
        "model.backbone.pretrained=false",
        "model.backbone.checkpoint_path=''",
        "model.captioner.pretrained=false",
    ]
    if cfg.model.captioner.pretrained:
        offline.append(f"model.captioner.n_positions={GPT2_POSITIONS}")
    cfg = load_config(config, [*offline, *(overrides or [])])
    with torch.device("meta"):
        return TICOD(cfg.model, cfg.loss, vocab_size, 0, 0, 0)


def table(counts: dict[str, dict[str, int]]) -> str:
    """Rows = parts, columns = configs, counts in millions with the exact number."""
    parts = list(dict.fromkeys(p for c in counts.values() for p in c))
    names = list(counts)
    width = max(len(p) for p in [*parts, "total"]) + 2
    cols = [max(len(n), 22) + 2 for n in names]
    lines = ["part".ljust(width) + "".join(n.rjust(c) for n, c in zip(names, cols, strict=True))]

    def cell(n: int | None, c: int) -> str:
        return ("-" if n is None else f"{n / 1e6:8.2f}M ({n:,})").rjust(c)

    for part in [*parts, "total"]:
        row = [counts[n].get(part) if part != "total" else sum(counts[n].values()) for n in names]
        lines.append(part.ljust(width) + "".join(cell(v, c) for v, c in zip(row, cols, strict=True)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS, help="YAML configs")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value config override")
    p.add_argument("--vocab-size", type=int, default=GPT2_VOCAB, help="tokenizer vocabulary size")
    args = p.parse_args(argv)
    counts = {
        Path(c).stem: build_on_meta(c, args.overrides, args.vocab_size).parameter_counts()
        for c in args.configs
    }
    print(table(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
