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


def build_model(cfg: Config, tokenizer, *, init_weights: bool = True) -> TICOD:
    """The joint model for ``cfg`` with the tokenizer's vocabulary and special tokens.

    ``init_weights=False``: the weights are left as allocated, for a caller that then loads every one of
    them (a resume; DeepSpeed loads the module strictly). The random init of torch's layers and of
    transformers' models is skipped (transformers' ``no_init_weights``, as its own loading does): most of a
    random-init build's time. Buffers are made as usual; the captioner's tied LM head is tied again.
    """
    if not init_weights:
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = build_model(cfg, tokenizer)
        if model.captioner is not None:
            model.captioner.gpt.tie_weights()  # init_weights, skipped above, is what ties it
        return model
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
