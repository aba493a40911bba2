"""Who am I in the job: rank, local rank, world size and master from the launcher's environment.

This is the one module that knows the launchers. ``python -m ticod.train`` runs unchanged

* under ``torchrun`` or the ``deepspeed`` launcher: they set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR`` and ``MASTER_PORT`` for every process; these win over anything else;
* under Slurm's ``srun`` (one task per GPU; recognised by ``SLURM_STEP_ID``): the values come from
  ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``, the tasks-per-node
  variables and the node list; the master is the first host of the node list and the port is derived
  from the job id, so every task of a job agrees without talking to the others;
* alone: a single process (rank 0 of 1) on a free local port. This includes a command run directly in an
  ``sbatch`` script without ``srun``: the batch shell has ``SLURM_PROCID=0`` and the job's
  ``SLURM_NTASKS`` but no step, and taking those as a world would wait forever for the other ranks.

In the last two cases :func:`world_info_from_env` writes the torch variables back into the environment
it read, so ``deepspeed.init_distributed`` and ``torch.distributed`` ``env://`` initialisation work
unchanged (without them DeepSpeed falls back to MPI discovery).

It is also the one layer over ``torch.distributed`` once the process group is up: :func:`rank`,
:func:`world_size`, the rank-0 guard :func:`is_rank0`, :func:`barrier`, the tensor all-reduce
:func:`all_reduce_` and the flag all-reduces :func:`all_true` / :func:`any_true`, the object collectives
:func:`gather_objects` (to every rank), :func:`gather_to_rank0` and :func:`broadcast_from_rank0`, and
:func:`destroy`. Each collective must be called by every rank; without a process group of two or more
ranks it is a no-op that returns this rank's own answer, so single-process code calls them alike.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

Launcher = Literal["slurm", "torchrun", "deepspeed", "none"]

# Slurm job ids map onto this port range; it stays clear of the well-known ports below 10000 and of
# the Linux ephemeral range (32768+), where a random outgoing connection could already hold the port.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The launcher's environment is inconsistent; the message names the variables involved."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: Launcher = "none"
    # Slurm --gpus-per-task: each task then sees only its own GPU(s), so local rank != CUDA index.
    gpus_per_task: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info_from_env(
    env: MutableMapping[str, str] | None = None,
    hostnames: Callable[[str], list[str]] | None = None,
) -> DistInfo:
    """Read this process's rank and world from torchrun/deepspeed, else Slurm, else single process.

    Args:
        env: the environment to read (default ``os.environ``); for Slurm and single-process runs the
            torch variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
            ``MASTER_ADDR``, ``MASTER_PORT``) are written back into it.
        hostnames: expands a Slurm node list; default :func:`expand_nodelist` (``scontrol``).

    Raises:
        LaunchError: a variable is missing or malformed, or the values contradict each other.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        info = _from_torch_vars(env)
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        info = _from_slurm(env, hostnames or expand_nodelist)
    else:
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
        info = DistInfo(master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port)
    _check(info)
    if info.launcher in ("slurm", "none"):
        export_env(info, env)
    return info


def export_env(info: DistInfo, env: MutableMapping[str, str]) -> None:
    """Write the torch launcher variables for ``info`` into ``env``."""
    env.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )


def _from_torch_vars(env: MutableMapping[str, str]) -> DistInfo:
    missing = [v for v in TORCH_VARS if v not in env]
    if missing:
        raise LaunchError(
            f"RANK and WORLD_SIZE are set, so a torchrun/deepspeed launch is assumed, but {', '.join(missing)} "
            "missing; set all of " + ", ".join(TORCH_VARS)
        )
    world_size = _int(env, "WORLD_SIZE")
    # The deepspeed launcher sets LOCAL_SIZE (and CROSS_RANK); torchrun sets LOCAL_WORLD_SIZE.
    launcher: Launcher = "deepspeed" if "LOCAL_SIZE" in env or "CROSS_RANK" in env else "torchrun"
    if "LOCAL_WORLD_SIZE" in env:
        local_world_size = _int(env, "LOCAL_WORLD_SIZE")
    elif "LOCAL_SIZE" in env:
        local_world_size = _int(env, "LOCAL_SIZE")
    else:
        local_world_size = world_size  # a launcher that does not say: assume one node
    return DistInfo(
        rank=_int(env, "RANK"),
        local_rank=_int(env, "LOCAL_RANK"),
        world_size=world_size,
        local_world_size=local_world_size,
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT"),
        launcher=launcher,
    )


def _from_slurm(env: MutableMapping[str, str], hostnames: Callable[[str], list[str]]) -> DistInfo:
    # Step variables describe the srun step this task belongs to (srun -n may use fewer tasks than
    # the allocation); the job variables are the fallback.
    ntasks_var = _first_present(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if ntasks_var is None:
        raise LaunchError("SLURM_PROCID is set but none of SLURM_STEP_NUM_TASKS, SLURM_NTASKS is")
    nodelist_var = _first_present(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if nodelist_var is None or not env[nodelist_var].strip():
        raise LaunchError(
            "running under Slurm (SLURM_PROCID is set) but the node list is missing: none of "
            "SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set, so the master host is unknown"
        )
    hosts = hostnames(env[nodelist_var])
    if not hosts:
        raise LaunchError(f"{nodelist_var}={env[nodelist_var]!r} expands to no host")
    # An explicit MASTER_ADDR/MASTER_PORT (e.g. exported by a site's job prologue) wins.
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    elif "SLURM_JOB_ID" in env:
        port = slurm_port(_int(env, "SLURM_JOB_ID"))
    else:
        raise LaunchError(
            "running under srun but SLURM_JOB_ID (for the rendezvous port) and MASTER_PORT are unset"
        )
    return DistInfo(
        rank=_int(env, "SLURM_PROCID"),
        local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
        world_size=_int(env, ntasks_var),
        local_world_size=_slurm_local_world_size(env),
        master_addr=env.get("MASTER_ADDR", hosts[0]),
        master_port=port,
        launcher="slurm",
        gpus_per_task=_int(env, "SLURM_GPUS_PER_TASK") if env.get("SLURM_GPUS_PER_TASK", "").isdigit() else 0,
    )


def _slurm_local_world_size(env: MutableMapping[str, str]) -> int:
    node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if var in env:
            counts = parse_tasks_per_node(env[var])
            if node >= len(counts):
                raise LaunchError(f"SLURM_NODEID={node} but {var}={env[var]!r} lists {len(counts)} node(s)")
            return counts[node]
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    return 1


def parse_tasks_per_node(value: str) -> list[int]:
    """Expand Slurm's tasks-per-node syntax, e.g. ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchError(f"cannot parse Slurm tasks-per-node value {value!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def expand_nodelist(nodelist: str) -> list[str]:
    """Hosts of a Slurm node list (``gpu[01-03],cpu7`` -> ``[gpu01, gpu02, gpu03, cpu7]``).

    Lists without ranges are split directly; ranges go through ``scontrol show hostnames``, Slurm's own
    parser, so every syntax the cluster accepts is understood.
    """
    if "[" not in nodelist:
        return [h for h in nodelist.split(",") if h]
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise LaunchError(
            f"node list {nodelist!r} needs `scontrol show hostnames`, but scontrol is not on PATH"
        )
    try:
        out = subprocess.run(
            [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"`scontrol show hostnames {nodelist}` failed: {e}") from None
    return out.split()


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job: the same on every task, different for concurrent jobs."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def free_port() -> int:
    """A currently free TCP port on this host (single-process runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_device(info: DistInfo) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available (made the current device), else ``cpu``.

    Raises:
        LaunchError: the GPUs this process sees cannot host one rank each.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if info.gpus_per_task:
        index = 0  # Slurm binds GPUs per task: each task sees only its own
    elif info.launcher == "slurm" and info.local_world_size != visible:
        raise LaunchError(
            f"Slurm started {info.local_world_size} tasks on this node (SLURM_STEP_TASKS_PER_NODE / "
            f"SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE) but {visible} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={shown}); run one task per GPU: --ntasks-per-node equal to --gpus-per-node"
        )
    elif info.local_world_size > visible:
        raise LaunchError(
            f"{info.local_world_size} ranks on this node (LOCAL_WORLD_SIZE) but only {visible} GPU(s) are "
            f"visible (CUDA_VISIBLE_DEVICES={shown})"
        )
    else:
        index = info.local_rank
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def backend_for(device: torch.device) -> Literal["nccl", "gloo"]:
    """NCCL for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(info: DistInfo, device: torch.device, timeout_s: float = 1800) -> None:
    """Start torch.distributed for ``info`` (for tools that do not go through DeepSpeed)."""
    dist.init_process_group(
        backend=backend_for(device),
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


# ---------------------------------------------------------------------------------- collectives
Op = Literal["sum", "max", "min"]


def is_distributed() -> bool:
    """Whether a process group is up (of any size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The process group's size; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    """The rank-0 guard: True on rank 0 of the process group, and in a process without one."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank got here (collective)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: Op = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over the ranks by ``op`` (collective; the tensor stays on its device, which
    the backend must serve: CUDA for NCCL, CPU for gloo). Returns ``tensor``."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
    return tensor


def _flag(flag: bool, device: torch.device | str, op: Op) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_(t, op)
    return bool(t.item() > 0)


def all_true(flag: bool, device: torch.device | str) -> bool:
    """Whether ``flag`` is true on every rank (collective: a one-element MIN all-reduce on ``device``)."""
    return _flag(flag, device, "min") if world_size() > 1 else flag


def any_true(flag: bool, device: torch.device | str) -> bool:
    """Whether ``flag`` is true on some rank (collective: a one-element MAX all-reduce on ``device``)."""
    return _flag(flag, device, "max") if world_size() > 1 else flag


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (collective; picklable objects)."""
    if world_size() < 2:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """``obj`` of every rank, in rank order, on rank 0; None on the other ranks (collective)."""
    if world_size() < 2:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (collective; what the other ranks pass is ignored)."""
    if world_size() < 2:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    """End the process group, if one is up (at exit, on every rank)."""
    if is_distributed():
        dist.destroy_process_group()


def _check(info: DistInfo) -> None:
    src = {
        "slurm": ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
        "torchrun": ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
        "deepspeed": ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
        "none": ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
    }[info.launcher]
    if info.world_size < 1:
        raise LaunchError(f"world size {info.world_size} ({src[2]}) must be >= 1")
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(
            f"rank {info.rank} ({src[0]}) is not in [0, world size {info.world_size}) ({src[2]})"
        )
    if not 0 <= info.local_rank < info.local_world_size:
        raise LaunchError(
            f"local rank {info.local_rank} ({src[1]}) is not in [0, {info.local_world_size}) "
            "(the number of ranks on this node)"
        )
    if info.local_world_size > info.world_size:
        raise LaunchError(
            f"{info.local_world_size} ranks on this node but a world size of {info.world_size} ({src[2]})"
        )
    if not 0 < info.master_port < 65536:
        raise LaunchError(f"MASTER_PORT={info.master_port} is not a TCP port")


def _first_present(env: MutableMapping[str, str], *names: str) -> str | None:
    return next((n for n in names if n in env), None)


def _int(env: MutableMapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
