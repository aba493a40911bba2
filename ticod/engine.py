"""Everything that touches DeepSpeed: its config, process-group start, the engine, ZeRO consolidation.

This is the project's only ``import deepspeed``. Mixed precision: ``bf16`` uses DeepSpeed's
``torch_autocast`` mode (fp32 master weights in the module, bf16 matmuls/convs under autocast, bf16
gradient reduction for Linear/Conv layers). Autocast lowers only matmuls and convolutions, so box
arithmetic stays fp32 where the model hands it fp32 tensors: anchors are built in fp32
(:class:`ticod.models.detector.FloatAnchorGenerator`), the RPN and cascade heads return fp32 logits and
deltas (box coding, proposal filtering, matching), and RoIAlign samples in fp32 at fp32 RoIs
(tests/test_precision.py checks all three). ``fp16`` is refused by :func:`ticod.config.validate`.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticod import cpu_comm, distributed
from ticod.budget import Plan, resolve_plan
from ticod.config import Config, Precision
from ticod.optim import build_optimizer, build_scheduler

UNIVERSAL_DIR = "universal"


def _ds():
    # DeepSpeed picks its accelerator at import time; with no GPU it must be told to use the CPU.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        cpu_comm.use_venv_extensions_dir()  # where DeepSpeed builds its CPU comm op
    import deepspeed

    return deepspeed


def init_distributed(backend: str, timeout_s: int) -> None:
    """Start the process group (env:// variables prepared by ticod.distributed); on CPU, leave no shared
    memory behind (:mod:`ticod.cpu_comm`)."""
    deepspeed = _ds()
    if backend == "gloo":
        cpu_comm.sweep_dead_buffers()
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False
    )
    if backend == "gloo":
        cpu_comm.release_own_buffer(distributed.rank(), distributed.world_size())


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Translate our typed config into a DeepSpeed JSON config."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            overlap_comm=ds.overlap_comm and torch.cuda.is_available(),
            allgather_bucket_size=ds.allgather_bucket_size,
            reduce_bucket_size=ds.reduce_bucket_size,
            contiguous_gradients=True,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # We pass torch AdamW (or DeepSpeedCPUAdam when offloading); ZeRO partitions it like any other.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.precision == Precision.bf16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def build_engine(
    model: nn.Module, cfg: Config, world_size: int, plan: Plan | None = None, *, load_universal: bool = False
):
    """Wrap ``model`` in a DeepSpeed engine with our AdamW groups and the warmup+cosine schedule of ``plan``
    (:func:`ticod.budget.resolve_plan`; without one, resolved here for a budget that needs no manifest).

    ``load_universal``: the engine will load a checkpoint made by :func:`to_universal` (another world size).
    """
    deepspeed = _ds()
    plan = plan or resolve_plan(cfg, world_size)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from ticod.optim import param_groups

        optimizer = DeepSpeedCPUAdam(
            param_groups(model, cfg.optim, plan.lr_scale),
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            adamw_mode=True,
        )
    else:
        optimizer = build_optimizer(model, cfg.optim, fused=torch.cuda.is_available(), lr_scale=plan.lr_scale)
    scheduler = build_scheduler(optimizer, cfg.optim, plan=plan)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size)
        | ({"checkpoint": {"load_universal": True}} if load_universal else {}),
        dist_init_required=False,
    )
    return engine


def to_universal(checkpoint_dir: Path) -> Path:
    """DeepSpeed's universal form of a ZeRO 1–3 checkpoint, which loads at any world size; made once, by the
    calling rank, beside the shards (``checkpoint_dir/universal``) and published atomically.

    Jobs that resume from the same checkpoint at once (two requeued jobs of one run dir) take turns: the
    conversion holds an exclusive ``flock`` on ``checkpoint_dir/universal.lock``, so the first converts and
    publishes with a rename, the others wait and then find it done. A conversion that died leaves only
    ``.tmp-universal``, which the next one removes. ``run_dir`` must then be on a filesystem where ``flock``
    works across nodes (local, NFSv4, Lustre mounted with ``flock``).
    """
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    out = checkpoint_dir / UNIVERSAL_DIR
    with open(checkpoint_dir / f"{UNIVERSAL_DIR}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (out / "zero").is_dir():
            return out
        tmp = checkpoint_dir / f".tmp-{UNIVERSAL_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that died
        args = Namespace(
            input_folder=str(checkpoint_dir),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # our checkpoints carry no Megatron-style universal info
        )
        ds_to_universal.main(args)
        (checkpoint_dir / "latest_universal").unlink(missing_ok=True)  # written by the converter; unused
        shutil.rmtree(out, ignore_errors=True)  # an incomplete one not made here (no zero/)
        tmp.rename(out)
    return out


def autocast_context(engine):
    """The autocast context DeepSpeed would use for this engine (for eval outside engine.forward)."""
    from deepspeed.runtime.torch_autocast import autocast_if_enabled

    return autocast_if_enabled(engine)


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 full model weights from one DeepSpeed checkpoint dir (any ZeRO stage), no engine needed.

    ZeRO stages 1-3 keep the fp32 master weights partitioned across the optimizer files; DeepSpeed's
    own ``zero_to_fp32`` reassembles them. Stage 0 stores the full module in the model-states file.
    Only checkpoint dirs written by our own runs are loaded (DeepSpeed's ``zero_to_fp32`` reads them with
    pickle); the stage-0 file holds only tensors, containers and numbers and loads with ``weights_only``.
    """
    path = Path(checkpoint_dir)
    if any(path.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        files = sorted(path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path} holds no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
