"""A model built for a resume (``build_model(init_weights=False)``: no random init) is the same model as a
fresh build once the checkpoint's weights are in: the same parameters, buffers and tying, and the same output.
The bit-exact resume tests (test_train.py, test_universal.py) cover the whole path through DeepSpeed."""

from __future__ import annotations

import torch
from tiny_model import TINY, VOCAB, word_tokenizer

from ticod.config import load_config
from ticod.factory import build_model


def test_build_without_init_equals_a_fresh_build_after_loading() -> None:
    cfg = load_config(None, [*TINY, "model.roi.head=4conv1fc", "model.roi.norm=syncbn"])
    tok = word_tokenizer()
    torch.manual_seed(0)
    fresh = build_model(cfg, tok)
    bare = build_model(cfg, tok, init_weights=False)
    assert len(tok) == VOCAB

    # The same tensors by name and shape, tied alike (GPT-2's LM head is its token embedding).
    assert {n: p.shape for n, p in fresh.named_parameters()} == {
        n: p.shape for n, p in bare.named_parameters()
    }
    gpt = bare.captioner.gpt
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    # Buffers that are not saved (Swin's relative position index, ...) are built, not left empty.
    saved = set(fresh.state_dict())
    for (name, a), (_, b) in zip(fresh.named_buffers(), bare.named_buffers(), strict=True):
        if name not in saved:
            assert torch.equal(a, b), name

    bare.load_state_dict(fresh.state_dict(), strict=True)
    fresh.eval(), bare.eval()
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        a, b = fresh.generate_captions(images, [(64, 96)] * 2), bare.generate_captions(images, [(64, 96)] * 2)
        fa, fb = fresh.backbone(images), bare.backbone(images)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
