"""DeepSpeed's CPU all-reduce buffers leave nothing in /dev/shm: each rank unlinks its own once every
rank mapped it, and buffers of ended runs are swept (ticod.cpu_comm)."""

from __future__ import annotations

import json
import mmap
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ticod import cpu_comm


def test_the_sweep_removes_only_this_users_buffers_that_no_process_maps(tmp_path: Path) -> None:
    uid, old = os.getuid(), time.time() - 3600

    def buffer(name: str, age: float = old) -> Path:
        path = tmp_path / f"{cpu_comm.PREFIX}{name}"
        path.write_bytes(b"\0" * mmap.PAGESIZE)
        os.utime(path, (age, age))
        return path

    dead = buffer(f"{uid}_127.0.0.1_29500_0")
    live = buffer(f"{uid}_127.0.0.1_29501_0")
    young = buffer(f"{uid}_127.0.0.1_29502_0", time.time())
    other = buffer(f"{uid + 1}_127.0.0.1_29500_0")
    with live.open("r+b") as f, mmap.mmap(f.fileno(), 0):  # mapped by this (live) process
        assert cpu_comm.sweep_dead_buffers(tmp_path, min_age_s=60) == [dead]
    assert not dead.exists() and live.exists() and young.exists() and other.exists()


def test_extensions_dir_is_the_venvs_unless_set(monkeypatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    expected = str(Path(sys.prefix) / "torch_extensions") if sys.prefix != sys.base_prefix else None
    assert cpu_comm.use_venv_extensions_dir() == expected
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert cpu_comm.use_venv_extensions_dir() == "/elsewhere"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    # What the deepspeed launcher sets on one machine: LOCAL_SIZE = world size makes the op use /dev/shm.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_SIZE="2",
        DS_ACCELERATOR="cpu",
    )
    from ticod import engine

    engine.init_distributed("gloo", 120)
    import deepspeed.comm as ds_comm

    t = torch.full((1000,), float(rank + 1))
    ds_comm.inference_all_reduce(t)  # through the unlinked, still mapped buffers (CPUs with AVX2)
    gone = not cpu_comm.own_buffer(rank).exists()
    ds_comm.barrier()
    Path(out, f"{rank}.json").write_text(json.dumps({"sum": t.tolist()[:3], "gone": gone}))
    ds_comm.destroy_process_group()


@pytest.mark.slow  # two processes
def test_a_two_rank_job_leaves_no_buffer_and_its_all_reduce_works(tmp_path: Path) -> None:
    port = _free_port()
    mp.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["sum"] == [3.0, 3.0, 3.0] and got["gone"]
    left = sorted(p.name for p in cpu_comm.SHM_DIR.glob(f"{cpu_comm.PREFIX}{os.getuid()}_127.0.0.1_{port}_*"))
    assert left == []
