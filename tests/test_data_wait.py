"""train/data_wait_frac: the slowest rank's share of step time spent waiting for data, carried by the log
window's one all-reduce, and the warning that names the fix when it stays high."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ticod.data_wait import WARN_AFTER, DataWaitWatch, rank_slots, wait_fraction

WAITS = (0.02, 0.3)  # seconds waited by rank 0 and rank 1 in a window of 1 s of steps


def test_a_high_wait_is_warned_after_several_windows_once_per_streak_naming_the_fix(caplog) -> None:
    watch = DataWaitWatch(num_workers=2, prefetch_factor=4)
    with caplog.at_level(logging.WARNING, logger="ticod.data_wait"):
        assert not watch.update(1, 0.5)  # one slow window (the loader starting) is no finding
        assert not watch.update(2, 0.01)
        warned = [watch.update(s, 0.2) for s in range(3, 3 + 2 * WARN_AFTER)]
    assert warned == [i == WARN_AFTER - 1 for i in range(2 * WARN_AFTER)]
    (record,) = caplog.records
    assert "20%" in record.message and "data.num_workers=2" in record.message
    assert "data.prefetch_factor=4" in record.message
    assert not watch.update(99, 0.05)  # 5% is not above 5%: the streak ends
    assert watch.streak == 0


def test_rank_slots_and_fraction() -> None:
    assert rank_slots(0.25, 2, 4) == [0.0, 0.0, 0.25, 0.0]
    assert wait_fraction(0.5, 2.0) == 0.25 and wait_fraction(1.0, 0.0) == 0.0 and wait_fraction(3, 2) == 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from ticod.train_metrics import Window

    calls = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    window = Window()
    window.add_losses({"loss": torch.tensor(1.0 + rank)}, 2)
    window.add_stats({"read": 2, "bad": {"bad_jpeg": rank}})
    window.step_time, window.steps, window.data_wait = 1.0, 2, WAITS[rank]
    metrics = window.reduce(torch.device("cpu"), 2)
    Path(out, f"{rank}.json").write_text(json.dumps({"metrics": metrics, "all_reduces": len(calls)}))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_the_window_logs_the_slowest_ranks_wait_in_its_one_all_reduce(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["all_reduces"] == 1  # the window's own reduction, nothing added per step or window
        m = got["metrics"]
        assert m["data_wait_frac"] == pytest.approx(max(WAITS))
        assert m["loss"] == pytest.approx(1.5) and m["read"] == 4 and m["bad"] == {"bad_jpeg": 1}
