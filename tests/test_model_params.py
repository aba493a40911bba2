"""Parameter counts of TICOD-small/large match the parts they are built from (models on the meta device)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("count_params", ROOT / "tools" / "count_params.py")
count_params = importlib.util.module_from_spec(spec)
spec.loader.exec_module(count_params)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("config", "swin", "channels", "backbone_m"),
    [
        ("ticod_small.yaml", "swin_tiny_patch4_window7_224", [96, 192, 384, 768], 27.5),
        ("ticod_large.yaml", "swin_base_patch4_window7_224", [128, 256, 512, 1024], 86.7),
    ],
)
def test_counts_match_timm_transformers_and_torchvision_parts(config, swin, channels, backbone_m):
    model = count_params.build_on_meta(ROOT / "configs" / config)
    counts = model.parameter_counts()
    assert sum(counts.values()) == numel(model)

    with torch.device("meta"):
        timm_swin = timm.create_model(swin, features_only=True, out_indices=(0, 1, 2, 3))
        gpt2 = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 x 768, 1024 positions, 50257 tokens
        gpt2_cross = GPT2LMHeadModel(GPT2Config(add_cross_attention=True))
        fpn = FeaturePyramidNetwork(channels, 256)
        rpn = RPNHead(256, 3)
    # timm's Swin minus its classifier and final norm, plus a LayerNorm per stage output (Swin-det's norm0-3).
    assert counts["backbone"] == numel(timm_swin) + 2 * sum(channels)
    assert round(counts["backbone"] / 1e6, 1) == backbone_m
    assert counts["gpt2"] == numel(gpt2) == 124_439_808
    # Per layer: K/V and Q projections, output projection, LayerNorm: 768*1536+1536 + 2*(768*768+768) + 2*768.
    assert counts["cross_attention"] == numel(gpt2_cross) - numel(gpt2) == 12 * 2_363_904
    assert counts["fpn"] == numel(fpn)
    assert counts["rpn"] == numel(rpn)
    # Per stage (the reference's 4conv1fc head): 4 x (3x3 conv 256 -> 256 without bias, BatchNorm), fc
    # (256*7*7 -> 1024), 81-way classifier, class-specific regressor (81 x 4).
    convs = 4 * (256 * 256 * 9 + 2 * 256)
    stage = convs + (256 * 49 * 1024 + 1024) + (1024 * 81 + 81) + (1024 * 81 * 4 + 81 * 4)
    assert counts["roi_stage0"] == counts["roi_stage1"] == counts["roi_stage2"] == stage
    # Visual memory: Linear(C5 -> 768) + LayerNorm(768) + one level embedding.
    assert counts["visual_memory"] == channels[-1] * 768 + 768 + 2 * 768 + 768


def test_command_prints_a_table_for_both_configs(capsys):
    assert count_params.main([]) == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()
    assert header.split() == ["part", "ticod_small", "ticod_large"]
    assert [r.split()[0] for r in rows] == [
        "backbone", "fpn", "rpn", "roi_stage0", "roi_stage1", "roi_stage2",
        "gpt2", "cross_attention", "visual_memory", "total",
    ]  # fmt: skip
    assert "(231,111,816)" in rows[-1] and "(290,655,622)" in rows[-1]


def test_object_memory_is_counted_where_the_decoder_reads_objects():
    model = count_params.build_on_meta(ROOT / "configs" / "demo.yaml")  # object_tokens 10, box head 256 wide
    counts = model.parameter_counts()
    assert sum(counts.values()) == numel(model)
    # Per part (256 box-head features, 7 class probabilities, 27 thumbnail pixels, 5 geometry) a
    # Linear(-> 128) + LayerNorm(128), and the object type embedding.
    assert counts["object_memory"] == sum((w + 1) * 128 + 2 * 128 for w in (256, 7, 27, 5)) + 128
