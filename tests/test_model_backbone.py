"""Swin backbone: any input size, NCHW maps, local weights, gradient checkpointing."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from tiny_model import TINY_SWIN

from ticod.config import BackboneConfig
from ticod.models.backbone import SwinBackbone, pad_to_multiple


def tiny_cfg(**overrides) -> BackboneConfig:
    return BackboneConfig(
        **{
            "name": "swin_tiny_patch4_window7_224",
            "drop_path_rate": 0.0,
            "kwargs": dict(TINY_SWIN),
            **overrides,
        }
    )


def test_pad_to_multiple_pads_bottom_right_with_zeros():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7) + 1
    y = pad_to_multiple(x, 4)
    assert y.shape == (2, 3, 8, 8)
    assert torch.equal(y[..., :5, :7], x)
    assert y[..., 5:, :].abs().sum() == 0 and y[..., :, 7:].abs().sum() == 0
    assert pad_to_multiple(y, 4) is y


def test_maps_are_nchw_at_strides_4_to_32_for_changing_sizes():
    torch.manual_seed(0)
    backbone = SwinBackbone(tiny_cfg())
    assert backbone.channels == [16, 32, 64, 128] and backbone.strides == [4, 8, 16, 32]
    assert backbone.size_divisor == 32
    # Odd sizes one batch after another, on the same module (no rebuild); the last is COCO-sized.
    for h, w in [(70, 101), (160, 96), (33, 200), (800, 1216)]:
        images = pad_to_multiple(torch.randn(1, 3, h, w), backbone.size_divisor)
        maps = backbone(images)
        H, W = images.shape[-2:]
        assert list(maps) == ["0", "1", "2", "3"]
        for (name, m), c, s in zip(maps.items(), backbone.channels, backbone.strides, strict=True):
            assert m.shape == (1, c, H // s, W // s), (name, m.shape)
            assert torch.isfinite(m).all()


def test_unpadded_input_is_rejected():
    backbone = SwinBackbone(tiny_cfg())
    with pytest.raises(ValueError, match="divisible by 32"):
        backbone(torch.randn(1, 3, 70, 64))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_file_is_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    # A classification Swin of the same variant, as timm (or the Swin authors) save it.
    source = timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(2)  # a different random init, so equality below proves the load
    backbone = SwinBackbone(tiny_cfg(checkpoint_path=str(path)))
    loaded = dict(backbone.body.named_parameters())
    for name, value in source.named_parameters():
        if name.startswith(("head.", "norm.")):
            continue  # the classifier and the final norm are not part of the feature extractor
        mapped = name.replace("layers.", "layers_", 1)
        assert torch.equal(loaded[mapped], value), name


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    backbone = SwinBackbone(tiny_cfg())
    images = torch.randn(2, 3, 64, 96)

    def run(enable: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        backbone.zero_grad(set_to_none=True)
        backbone.set_grad_checkpointing(enable)
        maps = backbone(images)
        sum((m * torch.linspace(-1, 1, m.shape[1])[:, None, None]).sum() for m in maps.values()).backward()
        return [m.detach() for m in maps.values()], [p.grad.clone() for p in backbone.parameters()]

    maps_off, grads_off = run(False)
    maps_on, grads_on = run(True)
    stages = [
        m for m in backbone.body.modules() if hasattr(m, "grad_checkpointing") and m is not backbone.body
    ]
    assert len(stages) == 4 and all(m.grad_checkpointing for m in stages)
    for a, b in zip(maps_off + grads_off, maps_on + grads_on, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stage_outputs_are_layer_normed():
    """Swin-det's norm0..norm3: every map is a LayerNorm over channels of its stage output."""
    torch.manual_seed(0)
    backbone = SwinBackbone(tiny_cfg())
    maps = backbone(torch.randn(2, 3, 64, 96) * 3)
    for i, m in enumerate(maps.values()):
        norm = getattr(backbone, f"norm{i}")
        assert isinstance(norm, torch.nn.LayerNorm) and norm.normalized_shape == (m.shape[1],)
        # Default init (weight 1, bias 0): zero mean and unit variance over the channels of each pixel.
        torch.testing.assert_close(m.mean(1), torch.zeros_like(m[:, 0]), rtol=0, atol=1e-5)
        torch.testing.assert_close(m.var(1, unbiased=False), torch.ones_like(m[:, 0]), rtol=0, atol=1e-3)


def test_imagenet_weights_load_into_the_body_and_the_stage_norms_are_the_only_new_keys():
    torch.manual_seed(1)
    source = timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN)  # random init, ImageNet layout
    # timm's features_only mapping: the classifier and its final norm dropped, layers.i -> layers_i.
    state = {
        k.replace("layers.", "layers_", 1): v
        for k, v in source.state_dict().items()
        if not k.startswith(("head.", "norm."))
    }
    backbone = SwinBackbone(tiny_cfg())
    backbone.body.load_state_dict(state, strict=True)
    missing, unexpected = backbone.load_state_dict({f"body.{k}": v for k, v in state.items()}, strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
