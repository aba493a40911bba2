"""ticod.data.tokenizer: trained byte-level BPE, local GPT-2-style dirs, caption encoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPT2TokenizerFast

from ticod.data.tokenizer import SPECIAL, encode_captions, load_tokenizer, train_caption_tokenizer

CAPTIONS = [
    "two red circles to the left of a blue square",
    "a picture with a green triangle at the top",
    "a yellow star in the bottom right corner",
    "three purple hexagons on a noisy background",
] * 5


def test_trained_bpe_saves_loads_and_round_trips(tmp_path: Path) -> None:
    tok = train_caption_tokenizer(CAPTIONS, tmp_path / "a", vocab_size=300)
    loaded = load_tokenizer(tmp_path / "a")
    eos = loaded.convert_tokens_to_ids(SPECIAL)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (eos, eos, eos)
    for text in [*CAPTIONS[:4], "an unseen Ünïcode caption 🙂"]:  # byte level: nothing is unknown
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text and ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(loaded("two red circles", add_special_tokens=False)["input_ids"]) < len("two red circles")
    # Same captions in any order -> the same tokenizer file.
    train_caption_tokenizer(reversed(CAPTIONS), tmp_path / "b", vocab_size=300)
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()
    with pytest.raises(ValueError, match="vocab_size"):
        train_caption_tokenizer(CAPTIONS, tmp_path / "c", vocab_size=100)


def test_local_gpt2_style_dir_gets_pad_token(tmp_path: Path) -> None:
    """A GPT-2 tokenizer dir (no pad token, as on the hub) loads with pad = bos = eos = <|endoftext|>."""
    train_caption_tokenizer(CAPTIONS, tmp_path / "bpe", vocab_size=300)
    core = Tokenizer.from_file(str(tmp_path / "bpe/tokenizer.json"))
    GPT2TokenizerFast(tokenizer_object=core, bos_token=SPECIAL, eos_token=SPECIAL).save_pretrained(
        tmp_path / "gpt2"
    )
    tok = load_tokenizer(str(tmp_path / "gpt2"))
    assert tok.pad_token == tok.eos_token == tok.bos_token == SPECIAL


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer dir not found"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="empty tokenizer name"):
        load_tokenizer("")


def test_encode_captions_bos_eos_truncation_padding(tmp_path: Path) -> None:
    tok = train_caption_tokenizer(CAPTIONS, tmp_path, vocab_size=300)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    body = tok("a yellow star", add_special_tokens=False)["input_ids"]
    n = len(body) + 2
    m = n + 3  # room for padding after the short caption
    out = encode_captions(tok, ["a yellow star", "word " * 3000, ""], max_tokens=m)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (3, m)
    assert ids[0, :n].tolist() == [bos, *body, eos] and mask[0].tolist() == [1] * n + [0] * (m - n)
    assert (ids[0, n:] == tok.pad_token_id).all()
    assert mask[1].all() and ids[1, 0] == bos and ids[1, -1] == eos  # truncated, EOS kept
    assert ids[2, :2].tolist() == [bos, eos] and mask[2].sum() == 2
