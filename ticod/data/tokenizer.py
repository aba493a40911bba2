"""Caption tokenizers: GPT-2's BPE by hub name or local dir, or a byte-level BPE trained on the captions.

Both come back as a ``transformers.PreTrainedTokenizerFast`` with BOS/EOS/PAD ids set (GPT-2 style: all
``<|endoftext|>``), and are saved as an ordinary HF tokenizer dir, so training, evaluation and
prediction load the same one with :func:`load_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL = "<|endoftext|>"  # GPT-2's only special token: BOS, EOS and padding


def _with_special_ids(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Fill in missing BOS/EOS/PAD the GPT-2 way (one ``<|endoftext|>`` token for all three)."""
    if tok.eos_token is None:
        if SPECIAL not in tok.get_vocab():
            tok.add_special_tokens({"eos_token": SPECIAL})
        tok.eos_token = SPECIAL
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """GPT-2 BPE by hub name ("gpt2"), a local HF tokenizer dir, or a dir saved by :func:`train_caption_tokenizer`."""
    name = str(name_or_path)
    if not name:
        raise ValueError("empty tokenizer name: give a hub name ('gpt2') or a tokenizer dir")
    if name.startswith("~"):
        name = str(Path(name).expanduser())
    if name.startswith(("/", ".")) and not Path(name).is_dir():
        raise FileNotFoundError(f"tokenizer dir not found: {name}")
    try:
        tok = AutoTokenizer.from_pretrained(name, use_fast=True)
    except OSError as e:  # neither a local dir nor a reachable hub repo
        raise FileNotFoundError(
            f"cannot load tokenizer '{name}' (no such local dir, hub unreachable?): {e}"
        ) from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"{name_or_path}: need a fast tokenizer, got {type(tok).__name__}")
    return _with_special_ids(tok)


def train_caption_tokenizer(
    captions: Iterable[str], out_dir: str | Path, vocab_size: int = 1000
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2's scheme, smaller vocabulary) on ``captions`` and save it to ``out_dir``.

    Byte-level means any text encodes (no unknown tokens), so captions of eval images never fail.
    """
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols + {SPECIAL}, got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted input: the learned merges then do not depend on record order.
    core.train_from_iterator(sorted(captions), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def encode_captions(
    tok: PreTrainedTokenizerFast, captions: Sequence[str], max_tokens: int
) -> dict[str, torch.Tensor]:
    """``BOS + tokens + EOS`` per caption, at most ``max_tokens`` long (EOS kept), right-padded.

    Returns:
        ``input_ids`` and ``attention_mask``, int64 (B, L) with L the longest sequence; pad positions have
        mask 0 (the pad id may equal EOS, so only the mask tells them apart).
    """
    if max_tokens < 2:
        raise ValueError("max_tokens must leave room for BOS and EOS")
    # Truncating in the tokenizer keeps a caption of thousands of words cheap.
    body = tok(list(captions), add_special_tokens=False, truncation=True, max_length=max_tokens - 2)[
        "input_ids"
    ]
    seqs = [[tok.bos_token_id, *ids, tok.eos_token_id] for ids in body]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.int64)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
