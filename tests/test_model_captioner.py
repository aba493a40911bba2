"""GPT-2 caption decoder: teacher-forced loss, visual memory, generation with the KV cache, loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from ticod.config import CaptionerConfig
from ticod.models.captioner import (
    CROSS_ATTENTION_PARTS,
    CaptionDecoder,
    ObjectMemory,
    Objects,
    VisualMemory,
    box_geometry,
)

VOCAB, BOS, EOS = 50, 1, 2
PADDED = (64, 96)
SIZES = [(64, 96), (40, 50)]


def decoder(object_parts: tuple[int, ...] = (), **overrides) -> CaptionDecoder:
    torch.manual_seed(0)
    cfg = CaptionerConfig(
        **{
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "n_positions": 24,
            "dropout": 0.0,
            "max_new_tokens": 6,
            **overrides,
        }
    )
    return CaptionDecoder(cfg, [16], VOCAB, BOS, EOS, EOS, object_parts=object_parts)


def maps() -> list[torch.Tensor]:
    return [torch.randn(2, 16, 2, 3, generator=torch.Generator().manual_seed(3))]  # stride 32 of PADDED


def captions() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[BOS, 5, 6, 7, 8, EOS], [BOS, 9, 10, EOS, EOS, EOS]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return ids, mask


def test_memory_masks_tokens_in_the_batch_padding():
    memory = VisualMemory([16], 32)
    tokens, mask = memory(maps(), SIZES, PADDED)
    assert tokens.shape == (2, 6, 32)
    # Image 1 is 40x50 of the 64x96 batch: rows ceil(40/32)=2, columns ceil(50/32)=2 of 2x3 are inside.
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0]]


def test_loss_is_cross_entropy_over_real_tokens_after_bos():
    dec = decoder().eval()
    ids, mask = captions()
    loss = dec(maps(), SIZES, PADDED, ids, mask)

    memory, memory_mask = dec.memory(maps(), SIZES, PADDED)
    logits = dec.gpt(
        input_ids=ids, attention_mask=mask, encoder_hidden_states=memory, encoder_attention_mask=memory_mask
    ).logits
    # Position t predicts token t+1; BOS is never a target, padding never counts (pad id == EOS here).
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    weights = mask[:, 1:].reshape(-1).float()
    torch.testing.assert_close(loss, (per_token * weights).sum() / weights.sum())

    other_pad = ids.masked_fill(mask == 0, 33)
    torch.testing.assert_close(dec(maps(), SIZES, PADDED, other_pad, mask), loss)


def test_label_smoothing_smooths_the_cross_entropy_of_the_same_tokens():
    ids, mask = captions()
    smoothed_dec = decoder(label_smoothing=0.1).eval()
    smoothed = smoothed_dec(maps(), SIZES, PADDED, ids, mask)

    memory, memory_mask = smoothed_dec.memory(maps(), SIZES, PADDED)
    logits = smoothed_dec.gpt(
        input_ids=ids, attention_mask=mask, encoder_hidden_states=memory, encoder_attention_mask=memory_mask
    ).logits[:, :-1]
    logp = logits.log_softmax(-1).reshape(-1, VOCAB)
    target = ids[:, 1:].reshape(-1)
    weights = mask[:, 1:].reshape(-1).float()
    nll = -logp.gather(1, target[:, None])[:, 0]
    per_token = 0.9 * nll - 0.1 * logp.mean(-1)
    torch.testing.assert_close(smoothed, (per_token * weights).sum() / weights.sum())
    # label_smoothing=0.0 at the call (the grounding gap's likelihood) is the plain cross-entropy.
    plain = smoothed_dec(maps(), SIZES, PADDED, ids, mask, label_smoothing=0.0)
    torch.testing.assert_close(plain, (nll * weights).sum() / weights.sum())
    # Uncaptioned rows are still no target: the loss equals that of the captioned row alone.
    only_first = smoothed_dec(maps(), SIZES, PADDED, ids, mask, has_caption=[True, False])
    first = (per_token * weights).view(2, -1)[0].sum() / weights.view(2, -1)[0].sum()
    torch.testing.assert_close(only_first, first)


def test_k_captions_per_image_read_their_image_and_weigh_every_token_the_same():
    dec = decoder().eval()
    ids, mask = captions()
    # Rows 0 and 1 are image 0's two captions, rows 2 and 3 image 1's (data.captions_per_image=2).
    ids2 = torch.cat([ids, ids.flip(0)])[[0, 2, 1, 3]]
    mask2 = torch.cat([mask, mask.flip(0)])[[0, 2, 1, 3]]
    k2 = dec(maps(), SIZES, PADDED, ids2, mask2)
    # The same as four images, each image's features repeated for its second caption: one token mean.
    repeated = [m.repeat_interleave(2, 0) for m in maps()]
    sizes = [SIZES[0], SIZES[0], SIZES[1], SIZES[1]]
    torch.testing.assert_close(k2, dec(repeated, sizes, PADDED, ids2, mask2))
    # has_caption is per image: image 1 uncaptioned drops both of its rows.
    torch.testing.assert_close(
        dec(maps(), SIZES, PADDED, ids2, mask2, has_caption=[True, False]),
        dec([repeated[0][:2]], sizes[:2], PADDED, ids2[:2], mask2[:2]),
    )
    with pytest.raises(ValueError, match="3 caption rows for 2 images"):
        dec(maps(), SIZES, PADDED, ids2[:3], mask2[:3])


def test_loss_ignores_features_in_the_padding():
    dec = decoder().eval()
    ids, mask = captions()
    changed = maps()
    changed[0][1, :, :, 2] += 5.0  # image 1's column outside its 50 px width
    torch.testing.assert_close(dec(changed, SIZES, PADDED, ids, mask), dec(maps(), SIZES, PADDED, ids, mask))
    changed[0][1, :, 0, 0] += 5.0  # inside the image: must matter
    assert not torch.allclose(dec(changed, SIZES, PADDED, ids, mask), dec(maps(), SIZES, PADDED, ids, mask))


def objects() -> Objects:
    """Image 0 with two objects, image 1 with one, of at most three (the third slot is padding)."""
    g = torch.Generator().manual_seed(8)
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 48.0, 32.0], [24.0, 16.0, 96.0, 64.0], [0.0] * 4],
            [[5.0, 4.0, 25.0, 24.0], *[[0.0] * 4] * 2],
        ]
    )
    return Objects(torch.randn(2, 3, 8, generator=g), boxes, torch.tensor([[1, 1, 0], [1, 0, 0]]))


def test_box_geometry_is_relative_to_each_image():
    geo = box_geometry(objects().boxes, SIZES)
    torch.testing.assert_close(geo[0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5, 0.25]))
    torch.testing.assert_close(geo[1, 0], torch.tensor([0.1, 0.1, 0.5, 0.6, 0.2]))


def test_each_part_of_an_object_enters_at_its_own_scale():
    """A class-probability part (sums to 1) moves the token as much whatever the scale of the feature part
    beside it; one Linear over the concatenation would let 1000x larger features drown it."""
    torch.manual_seed(0)
    memory = ObjectMemory([5, 3], 16)
    box = torch.tensor([[[0.0, 0.0, 20.0, 20.0]] * 2])

    def class_effect(feature_scale: float) -> torch.Tensor:
        feature = torch.randn(1, 1, 5, generator=torch.Generator().manual_seed(1)) * feature_scale
        one_hot = torch.eye(3)[None, :2]  # the same object as class 0, then as class 1
        tokens, _ = memory(
            Objects(torch.cat([feature.expand(1, 2, 5), one_hot], -1), box, torch.ones(1, 2)), [(40, 40)]
        )
        return tokens[0, 1] - tokens[0, 0]

    torch.testing.assert_close(class_effect(1000.0), class_effect(1.0))
    assert class_effect(1.0).norm() > 1.0


def test_object_tokens_reach_the_loss_and_their_padding_does_not():
    dec = decoder(object_parts=(5, 3)).eval()
    ids, mask = captions()
    base = dec(maps(), SIZES, PADDED, ids, mask, objects=objects())
    padding = objects()
    padding.features[0, 2] += 5.0
    padding.boxes[1, 1] += 7.0
    torch.testing.assert_close(dec(maps(), SIZES, PADDED, ids, mask, objects=padding), base)
    feature, box = objects(), objects()
    feature.features[1, 0] += 1.0
    box.boxes[0, 1] = torch.tensor([60.0, 40.0, 96.0, 64.0])  # the same feature at another place
    for other in (feature, box):
        assert not torch.allclose(dec(maps(), SIZES, PADDED, ids, mask, objects=other), base)
    # Generation reads them as well; a decoder built with objects needs them, one without refuses them.
    assert len(dec.generate(maps(), SIZES, PADDED, objects=objects())) == 2
    with pytest.raises(ValueError, match="pass objects"):
        dec(maps(), SIZES, PADDED, ids, mask)
    with pytest.raises(ValueError, match="without object tokens"):
        decoder()(maps(), SIZES, PADDED, ids, mask, objects=objects())


def greedy_without_cache(dec: CaptionDecoder, steps: int) -> torch.Tensor:
    memory, memory_mask = dec.memory(maps(), SIZES, PADDED)
    ids = torch.full((2, 1), BOS)
    with torch.no_grad():
        for _ in range(steps):
            logits = dec.gpt(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask,
                use_cache=False,
            ).logits
            logits[:, -1, BOS] = -math.inf  # BOS (here unlike EOS) is never generated
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, 1:]


def until(seq: list[int], eos: int) -> list[int]:
    return seq[: seq.index(eos)] if eos in seq else seq


def spread_weights(dec: CaptionDecoder) -> None:
    """Large random weights, so that greedy and beam search pick varied tokens."""
    for p in dec.gpt.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=1.0)


def test_greedy_generation_with_cache_matches_a_plain_argmax_loop_and_stops_at_eos():
    dec = decoder(max_new_tokens=8).eval()
    spread_weights(dec)
    reference = greedy_without_cache(dec, 8).tolist()
    generated = [g.tolist() for g in dec.generate(maps(), SIZES, PADDED, num_beams=1)]
    assert generated == [until(r, EOS) for r in reference]

    # Another end token, first produced after a few tokens of image 0: generation stops there.
    new_eos = next(t for i, t in enumerate(reference[0]) if i >= 2 and reference[0].index(t) == i)
    dec.eos_token_id = new_eos
    generated = [g.tolist() for g in dec.generate(maps(), SIZES, PADDED, num_beams=1)]
    assert generated == [until(r, new_eos) for r in reference]
    assert len(generated[0]) >= 2 and len(generated[1]) == 8  # stopped early / ran to max_new_tokens


def test_beam_search_with_cache_batches_images_independently():
    dec = decoder(num_beams=3).eval()
    spread_weights(dec)
    batched = dec.generate(maps(), SIZES, PADDED)  # beams from the config
    memory, memory_mask = dec.memory(maps(), SIZES, PADDED)
    for i in range(2):
        kwargs = {
            "input_ids": torch.full((1, 1), BOS),
            "encoder_hidden_states": memory[i : i + 1],
            "encoder_attention_mask": memory_mask[i : i + 1],
            "num_beams": 3,
            "max_new_tokens": 6,
            "do_sample": False,
            "eos_token_id": EOS,
            "pad_token_id": EOS,
            "suppress_tokens": [BOS],
        }
        cached = dec.gpt.generate(**kwargs, use_cache=True)[0, 1:]
        uncached = dec.gpt.generate(**kwargs, use_cache=False)[0, 1:]
        assert cached.tolist() == uncached.tolist()
        assert batched[i].tolist() == until(cached.tolist(), EOS)


def test_length_penalty_ranks_finished_beams_by_length():
    """model.captioner.length_penalty reaches beam search (transformers' summed log-probability / length **
    penalty): below 0 it favours short captions, above 0 long ones."""
    lengths: dict[float, list[int]] = {}
    for penalty in (-2.0, 2.0):
        dec = decoder(num_beams=4, max_new_tokens=8, length_penalty=penalty).eval()
        spread_weights(dec)
        lengths[penalty] = []
        for eos in range(3, 21):  # end tokens that the beams meet at various steps
            dec.eos_token_id = eos
            lengths[penalty] += [len(g) for g in dec.generate(maps(), SIZES, PADDED)]
    assert all(a <= b for a, b in zip(lengths[-2.0], lengths[2.0], strict=True))
    assert sum(lengths[-2.0]) < sum(lengths[2.0]) - 10


def test_pretrained_gpt2_from_a_local_dir_adds_only_cross_attention(tmp_path):
    torch.manual_seed(5)
    source = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=2, n_head=2))
    source.save_pretrained(tmp_path / "gpt2")
    dec = decoder(name=str(tmp_path / "gpt2"), pretrained=True)
    ours = dict(dec.gpt.named_parameters())
    theirs = dict(source.named_parameters())
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    new = set(ours) - set(theirs)
    assert new and all(any(part in n for part in CROSS_ATTENTION_PARTS) for n in new)
    assert dec.gpt.config.add_cross_attention


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    ids, mask = captions()
    results = []
    for enable in (False, True):
        dec = decoder(grad_checkpointing=enable).train()
        loss = dec(maps(), SIZES, PADDED, ids, mask)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in dec.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)
