"""Build the tokenizer and the model from a config (shared by train, evaluate, predict, export)."""

from __future__ import annotations

from pathlib import Path

from ticod.config import Config, DataConfig
from ticod.data.tokenizer import load_tokenizer
from ticod.models import TICOD


def tokenizer_path(cfg: DataConfig) -> str:
    """``data.tokenizer``, or the BPE saved next to the shards when it is empty."""
    return cfg.tokenizer or str(Path(cfg.shards_dir) / "tokenizer")


def build_tokenizer(cfg: DataConfig):
    return load_tokenizer(tokenizer_path(cfg))


def build_model(cfg: Config, tokenizer) -> TICOD:
    """The joint model for ``cfg`` with the tokenizer's vocabulary and special tokens."""
    return TICOD(
        cfg.model,
        cfg.loss,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
        pixel_mean=cfg.data.mean,
        pixel_std=cfg.data.std,
    )
