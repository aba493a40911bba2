"""checkpoint.async_save in one process: the background write stores what a synchronous save stores, from
the moment of the save; nothing is published before the write is done; a failed write publishes nothing."""

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from ticod import checkpoint as ck
from ticod.config import load_config


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)
        self.tied = nn.Linear(4, 16, bias=False)
        self.tied.weight = self.backbone.weight  # shared storage, as GPT-2's tied embedding

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x))).pow(2).mean()


def _engine():
    from ticod.engine import build_engine

    cfg = load_config(
        overrides=[
            "deepspeed.zero_stage=2",
            "deepspeed.precision=fp32",
            "max_steps=10",
            "optim.warmup_steps=2",
        ]
    )
    torch.manual_seed(0)
    return build_engine(Toy(), cfg, world_size=1)


def _step(engine, n: int = 1) -> None:
    for _ in range(n):
        engine.backward(engine(torch.randn(2, 8)))
        engine.step()


def _files(ckpt: Path) -> dict[str, bytes]:
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


def test_async_save_writes_the_state_of_the_save_moment(tmp_path, single_rank_pg, monkeypatch):
    """Byte for byte the files of a synchronous save of the same state, although the engine trains on before
    the write; twice, the second into the staging buffers of the first; published only by wait()."""
    gate, write = threading.Event(), ck.Checkpointer._write

    def held_write(self, *args):  # the write starts once the engine trained on
        assert gate.wait(120)
        write(self, *args)

    monkeypatch.setattr(ck.Checkpointer, "_write", held_write)
    engine = _engine()
    published: list[ck.SaveTimes] = []
    sync = ck.Checkpointer(tmp_path / "sync", keep_last=2)
    background = ck.Checkpointer(
        tmp_path / "async", keep_last=2, async_save=True, on_published=published.append
    )
    for step in (3, 5):
        _step(engine, 3 if step == 3 else 2)
        torch.manual_seed(step)
        expected = sync.save(engine, step, {"train": {"step": step}})
        torch.manual_seed(step)  # the same RNG state in both checkpoints
        buffers = list(background.staging._buffers)
        got = background.save(engine, step, {"train": {"step": step}})
        if step == 5:  # the second save copied into the first one's buffers
            assert [id(b) for b in background.staging._buffers] == [id(b) for b in buffers]
        assert not got.exists() and background.pending and background.write_flag() == 1
        _step(engine)  # the live weights and optimizer state change before the write
        gate.set()
        background.wait()
        gate.clear()
        assert not background.pending and got.is_dir() and published[-1].step == step
        assert 0 < published[-1].blocking_s <= published[-1].total_s
        assert _files(got) == _files(expected)
    assert [p.name for p in ck.list_checkpoints(tmp_path / "async")] == [
        ck.checkpoint_name(3),
        ck.checkpoint_name(5),
    ]
    assert not list((tmp_path / "async" / ck.CKPT_DIR).glob(f"{ck.TMP_PREFIX}*"))


def test_a_failed_background_write_publishes_nothing(tmp_path, single_rank_pg, monkeypatch):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    engine = _engine()
    saver = ck.Checkpointer(tmp_path, keep_last=3, async_save=True)
    _step(engine)
    saver.save(engine, 1, {"train": {"step": 1}})
    saver.wait()

    def disk_full(self, state_dict, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TorchCheckpointEngine, "save", disk_full)
    _step(engine)
    saver.save(engine, 2, {"train": {"step": 2}})
    saver._thread.join()
    assert saver.write_flag() == 2
    with pytest.raises(RuntimeError, match="writing checkpoint 2 failed"):
        saver.wait()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.checkpoint_name(1)]
    assert not saver.pending
