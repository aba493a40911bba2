"""The TICOD network: Swin backbone, FPN + RPN + Cascade R-CNN, GPT-2 caption decoder, joint loss.

Single-device model code: nothing here imports deepspeed, torch.distributed or wandb, or reads the
environment.
"""

from ticod.models.ticod import TICOD

__all__ = ["TICOD"]
