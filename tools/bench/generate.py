"""Caption generation: captions/s, greedy and beam search, with the KV cache vs. the same decoder without it.

``python tools/bench/generate.py [--beams 3 --max-new-tokens 30] [--device cuda --precision bf16 ...]``

The backbone runs once per batch outside the timing; each side then generates captions for the same
image features with ``CaptionDecoder.generate(..., use_cache=True/False)``. Greedy and beam search are
deterministic, so the cached and uncached captions must be identical (checked and reported): the cache
only removes the recomputation of the prefix (self-attention keys/values, and the cross-attention
keys/values of the image tokens) at every step. A random-init decoder rarely emits EOS, so captions run
to ``--max-new-tokens``: every side generates the same number of tokens.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from common import (
    Report,
    Row,
    add_common_args,
    alternate,
    autocast,
    bench_config,
    fixed_batches,
    make_demo_data,
    model_vocab,
    setup,
    timed,
    workdir,
)

from ticod.data.tokenizer import load_tokenizer
from ticod.models import TICOD
from ticod.models.backbone import pad_to_multiple


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, default_out="bench_results/generate.json")
    p.add_argument("--beams", type=int, default=3, help="beam width of the beam-search rows")
    p.add_argument("--max-new-tokens", type=int, default=0, help="default: the config's")
    p.add_argument("--batches", type=int, default=2, help="batches of images per side per round")
    p.add_argument("--images", type=int, default=32, help="demo images to generate (without --data)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    report = Report("generate", device, vars(args))
    with workdir() as tmp:
        shards = args.data or make_demo_data(tmp, args.images)[1]
        cfg = bench_config(args, shards, "loss.task=caption", "model.captioner.use_fpn_levels=false")
        tok = load_tokenizer(f"{shards}/tokenizer")
        batches = [b.to(device, non_blocking=False) for b in fixed_batches(cfg, tok, args.batches, args.seed)]
    torch.manual_seed(args.seed)
    model = TICOD(
        cfg.model, cfg.loss, model_vocab(cfg, tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )
    model = model.to(device).eval()
    max_new = args.max_new_tokens or cfg.model.captioner.max_new_tokens
    inputs = []
    with torch.no_grad(), autocast(cfg, device):
        for b in batches:
            padded = pad_to_multiple(b.images, model.backbone.size_divisor)
            # The caption-only model reads the last backbone stage (the same maps TICOD passes).
            maps = model._memory_maps(model.backbone(padded), None)
            inputs.append((maps, b.image_sizes, tuple(padded.shape[-2:])))
    n_images = sum(len(s) for _, s, _ in inputs)

    def generate(beams: int, cache: bool) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        with autocast(cfg, device):
            for maps, sizes, shape in inputs:
                out += model.captioner.generate(maps, sizes, shape, beams, max_new, use_cache=cache)
        return out

    def side(beams: int, cache: bool) -> Any:
        return lambda: n_images / timed(lambda: generate(beams, cache), device)

    outputs = {(b, c): generate(b, c) for b in (1, args.beams) for c in (True, False)}
    same = {
        name: all(torch.equal(x, y) for x, y in zip(outputs[(b, True)], outputs[(b, False)], strict=True))
        for name, b in (("greedy", 1), ("beam", args.beams))
    }
    lengths = {f"beams={b}": sum(len(x) for x in outputs[(b, True)]) / n_images for b in (1, args.beams)}
    report.extra.update(identical_captions_with_and_without_cache=same, mean_caption_tokens=lengths)
    print(f"{n_images} images per pass, up to {max_new} new tokens; mean generated tokens {lengths}")
    print(f"cached == uncached captions: {same}")
    print("captions/s:")
    v = alternate(
        {
            "greedy_cache": side(1, True),
            "greedy_nocache": side(1, False),
            "beam_cache": side(args.beams, True),
            "beam_nocache": side(args.beams, False),
        },
        repeats=args.repeats,
        warmup=args.warmup,
    )
    rows = [
        Row("greedy, KV cache", v["greedy_cache"], "captions/s", "greedy, no cache"),
        Row("greedy, no cache", v["greedy_nocache"], "captions/s"),
        Row(f"beam {args.beams}, KV cache", v["beam_cache"], "captions/s", f"beam {args.beams}, no cache"),
        Row(f"beam {args.beams}, no cache", v["beam_nocache"], "captions/s"),
    ]
    report.table(f"Caption generation ({max_new} new tokens, batch {len(inputs[0][1])})", rows)
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
