"""Mixed precision: box arithmetic stays fp32 under bf16 autocast, fp16 is refused, bf16 trains like fp32."""

from __future__ import annotations

import copy
import functools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import BOS, EOS, VOCAB, batch, build
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from ticod.config import ConfigError, load_config
from ticod.data.samples import Batch
from ticod.models import TICOD


def wide_batch() -> Batch:
    """One 128×1344 image with boxes beyond x = 1024, where bf16 spacing is 8 px."""
    b = batch()
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor(
        [[1030.0, 40.0, 1101.0, 97.0], [1210.0, 10.0, 1333.0, 121.0], [20.0, 8.0, 60.0, 50.0]]
    )
    return Batch(
        images=torch.randn(1, 3, 128, 1344, generator=g),
        image_sizes=[(128, 1344)],
        targets=[{"boxes": boxes, "labels": torch.tensor([1, 2, 3])}],
        captions={k: v[:1] for k, v in b.captions.items()},
    )


def test_anchors_box_coding_and_rois_are_fp32_under_bf16_autocast(monkeypatch):
    model = build()
    det = model.detector
    seen: dict[str, list[torch.dtype]] = {"anchors": [], "coder": [], "rois": []}
    anchors: list[list[torch.Tensor]] = []
    shapes: list[torch.Size] = []
    det.rpn.anchor_generator.register_forward_hook(lambda m, args, out: anchors.append(out))
    det.rpn.anchor_generator.register_forward_pre_hook(
        lambda m, args: shapes.__setitem__(slice(None), [f.shape for f in args[1]])
    )
    det.roi_heads.register_forward_pre_hook(
        lambda m, args: seen["rois"].extend(p.dtype for p in args[1])  # RPN proposals into the cascade
    )
    det.roi_heads.box_roi_pool.register_forward_pre_hook(
        lambda m, args: seen["rois"].extend(b.dtype for b in args[1])  # every stage's RoIs
    )

    def record(fn):
        @functools.wraps(fn)
        def wrapper(self, a, b):
            seen["coder"] += [a.dtype, b.dtype]
            out = fn(self, a, b)
            seen["coder"].append(out.dtype)
            return out

        return wrapper

    for name in ("encode_single", "decode_single"):  # RPN and every cascade stage
        monkeypatch.setattr(det_utils.BoxCoder, name, record(getattr(det_utils.BoxCoder, name)))

    b = wide_batch()
    for training in (True, False):
        model.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            out = model(b.images, b.targets if training else None, b.captions, b.image_sizes)
        if training:
            assert out["loss"].isfinite()
        (got,) = anchors.pop()
        assert got.dtype == torch.float32
        # Exact: torchvision's generator on fp32 maps of the same shapes (not rounded to 8 px at x > 1024).
        maps = [torch.zeros(s) for s in shapes]
        (expected,) = AnchorGenerator.forward(
            det.rpn.anchor_generator, ImageList(b.images, b.image_sizes), maps
        )
        assert torch.equal(got, expected)
    assert seen["coder"] and set(seen["coder"]) == {torch.float32}
    assert seen["rois"] and set(seen["rois"]) == {torch.float32}


def test_fp16_is_refused_with_the_alternatives():
    with pytest.raises(ConfigError, match=r"deepspeed\.precision.*bf16.*fp32"):
        load_config(None, ["deepspeed.precision=fp16"])


# bf16 keeps 8 mantissa bits (relative rounding 2**-9 per op). Measured on the demo model (2026-11-30):
# every loss part above 1e-3 within 0.06% of fp32 (the total 0.01%); the near-zero box losses of the
# later stages (~1e-6) within 1.5% relative. Tolerance: 1% relative or 1e-3 absolute.
REL_TOL, ABS_TOL = 0.01, 1e-3


def test_one_step_bf16_matches_fp32(single_rank_pg):
    from ticod.engine import build_engine

    losses = {}
    start = None
    for precision in ("fp32", "bf16"):
        cfg = load_config("demo", [f"deepspeed.precision={precision}", "model.num_classes=4"])
        if start is None:
            torch.manual_seed(0)
            start = TICOD(cfg.model, cfg.loss, VOCAB, BOS, EOS, EOS)
        engine = build_engine(copy.deepcopy(start), cfg, 1)
        engine.train()
        b = batch()
        torch.manual_seed(1)  # the same RPN/RoI sampling draws
        out = engine(b.images, targets=b.targets, captions=b.captions, image_sizes=b.image_sizes)
        engine.backward(out["loss"])
        engine.step()
        assert all(p.isfinite().all() for p in engine.module.parameters())
        losses[precision] = {k: v.item() for k, v in out.items()}
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert fp32.keys() == bf16.keys()
    for k in fp32:
        assert math.isfinite(fp32[k]) and math.isfinite(bf16[k]), k
        assert bf16[k] == pytest.approx(fp32[k], rel=REL_TOL, abs=ABS_TOL), k


def test_gpu_check_runs_on_a_gpu_or_with_cpu_small():
    """tools/gpu_check.py: its --help, and no silent CPU run where a GPU was asked for (the reduced CPU
    mode itself takes minutes; it is run by hand, see the script's docstring)."""
    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py")]
    helped = subprocess.run([*script, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--cpu-small" in helped.stdout
    if not torch.cuda.is_available():
        refused = subprocess.run(script, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "--cpu-small" in refused.stderr
