"""timm Swin Transformer as a multi-scale feature extractor (NCHW maps at strides 4, 8, 16, 32)."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ticod.config import BackboneConfig


def pad_to_multiple(images: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) batch at the bottom/right so H and W are multiples of ``divisor``.

    Bottom/right padding keeps pixel coordinates unchanged, so boxes and ``image_sizes`` stay valid.
    """
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % divisor, -w % divisor
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h))


class SwinBackbone(nn.Module):
    """Swin through timm's ``features_only`` wrapper, returning ``{"0": C2, "1": C3, "2": C4, "3": C5}``.

    Each stage output passes a LayerNorm of its own (``norm0``..``norm3``, as the Swin detection backbone of
    Swin-Transformer-Object-Detection has; timm's feature taps have none) before it goes to the FPN. They
    sit outside :attr:`body`, so ImageNet weights load into ``body`` exactly as timm maps them.

    timm builds the Swin with ``strict_img_size=False`` (attention masks made per forward, so any input
    size works without rebuilding) and ``always_partition=True`` (every stage keeps its window and shift
    even when the feature map is smaller than the window, as detection Swins do; otherwise timm would
    fix smaller windows from the 224 px default size at construction).

    Args:
        cfg: Variant name, weights source, drop path, grad checkpointing and extra timm kwargs.
        normed: Stages whose output gets its LayerNorm; only those read downstream (a norm that no loss
            reaches would get no gradient, which ZeRO does not allow).
    """

    def __init__(self, cfg: BackboneConfig, normed: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        super().__init__()
        kwargs = {
            "strict_img_size": False,
            "always_partition": True,
            "drop_path_rate": cfg.drop_path_rate,
            # Plain lists and dicts: timm stores some of these on the model and may copy or compare them.
            **(
                OmegaConf.to_container(cfg.kwargs) if isinstance(cfg.kwargs, DictConfig) else dict(cfg.kwargs)
            ),
        }
        pretrained = cfg.pretrained or bool(cfg.checkpoint_path)
        if cfg.checkpoint_path:
            # timm loads a local file (safetensors, or torch.load with weights_only=True) through the
            # same path as hub weights, including Swin's checkpoint filter (bias-table resizing).
            kwargs["pretrained_cfg_overlay"] = {"file": cfg.checkpoint_path}
        self.body = timm.create_model(
            cfg.name, pretrained=pretrained, features_only=True, out_indices=(0, 1, 2, 3), **kwargs
        )
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        # Stage 0 is the patch embedding, each later stage halves the map: inputs divisible by the
        # last stride give maps of exactly H/stride, which FPN and the anchor strides assume.
        self.size_divisor: int = self.strides[-1]
        for i, channels in enumerate(self.channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels) if i in normed else nn.Identity())
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations block by block in backward (timm's per-stage ``checkpoint_seq``)."""
        # Per-block checkpointing inside each stage, not timm's wrapper-level switch, which would skip
        # the first and last stages and nest checkpoints if both were on.
        for module in self.body.modules():
            if module is not self.body and hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps of a batch whose H, W are multiples of :attr:`size_divisor`.

        Args:
            images: (B, 3, H, W) normalised images.

        Returns:
            Four NCHW maps keyed "0".."3" (the names FPN and RoIAlign use).
        """
        h, w = images.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f"input {h}x{w} is not divisible by {self.size_divisor}; use pad_to_multiple")
        # timm's Swin feature taps are NHWC, as LayerNorm over channels wants them.
        return {
            str(i): getattr(self, f"norm{i}")(f).permute(0, 3, 1, 2).contiguous()
            for i, f in enumerate(self.body(images))
        }
