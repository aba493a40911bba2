"""Checkpoint publish/prune/latest semantics and a real single-rank DeepSpeed save -> load -> export."""

import json

import pytest
import torch
from torch import nn

from ticod import checkpoint as ck
from ticod.config import load_config


def _fake_ckpt(run_dir, step, complete=True):
    d = (
        run_dir
        / ck.CKPT_DIR
        / (ck.checkpoint_name(step) if complete else f"{ck.TMP_PREFIX}{ck.checkpoint_name(step)}")
    )
    d.mkdir(parents=True)
    (d / ck.STATE_FILE).write_text(json.dumps({"train": {"step": step}}))
    return d


def test_latest_ignores_partial_and_unmarked(tmp_path):
    _fake_ckpt(tmp_path, 10)
    _fake_ckpt(tmp_path, 30, complete=False)  # being written: never latest
    unmarked = tmp_path / ck.CKPT_DIR / ck.checkpoint_name(40)
    unmarked.mkdir()  # no trainer_state.json: not complete
    _fake_ckpt(tmp_path, 20)
    assert ck.latest_checkpoint(tmp_path).name == ck.checkpoint_name(20)
    assert ck.resolve_resume("auto", tmp_path).name == ck.checkpoint_name(20)
    assert ck.resolve_resume("", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete"):
        ck.resolve_resume(str(unmarked), tmp_path)


def test_auto_resume_with_no_checkpoints(tmp_path):
    assert ck.resolve_resume("auto", tmp_path) is None


def test_prune_keeps_newest(tmp_path):
    for s in (100, 200, 300, 1000):
        _fake_ckpt(tmp_path, s)
    partial = _fake_ckpt(tmp_path, 1100, complete=False)
    ck.prune(tmp_path, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        ck.checkpoint_name(300),
        ck.checkpoint_name(1000),
    ]
    assert partial.exists()  # prune only touches complete ones
    ck.prune(tmp_path, keep_last=0)  # never deletes the only good one
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.checkpoint_name(1000)]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x))).pow(2).mean()


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_roundtrip(tmp_path, single_rank_pg, stage):
    from ticod.engine import build_engine, consolidated_state_dict

    cfg = load_config(
        overrides=[
            f"deepspeed.zero_stage={stage}",
            "deepspeed.precision=fp32",
            "max_steps=10",
            "optim.warmup_steps=2",
        ]
    )
    torch.manual_seed(0)
    engine = build_engine(Toy(), cfg, world_size=1)
    x = torch.randn(2, 8)
    for _ in range(3):
        engine.backward(engine(x))
        engine.step()
    torch.manual_seed(123)
    path = ck.save_checkpoint(engine, tmp_path, 3, {"train": {"step": 3}}, keep_last=2)
    assert path.name == ck.checkpoint_name(3) and not list((tmp_path / ck.CKPT_DIR).glob(".tmp-*"))
    expected_next_rand = torch.rand(3)
    weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    lr = engine.get_lr()

    # Consolidated fp32 weights equal the live module's.
    state = consolidated_state_dict(path)
    assert set(state) == set(weights)
    for k in weights:
        torch.testing.assert_close(state[k], weights[k])

    torch.manual_seed(0)
    fresh = build_engine(Toy(), cfg, world_size=1)
    ts = ck.load_checkpoint(fresh, path)
    assert ts == {"train": {"step": 3}}
    ck.restore_rng(path)
    torch.testing.assert_close(torch.rand(3), expected_next_rand)  # RNG restored
    assert fresh.get_lr() == lr
    for k, v in fresh.module.state_dict().items():
        torch.testing.assert_close(v, weights[k])
    # The optimizer state came back too: one more identical step gives identical weights.
    engine.backward(engine(x))
    engine.step()
    fresh.backward(fresh(x))
    fresh.step()
    for k, v in fresh.module.state_dict().items():
        torch.testing.assert_close(v, engine.module.state_dict()[k])


def test_grad_norm_is_reported_at_every_zero_stage(single_rank_pg):
    """DeepSpeed reports no gradient norm at stage 0 in fp32; the trainer's own equals stage 2's and torch's."""
    from ticod.engine import build_engine
    from ticod.train_metrics import unreported_grad_norm

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    plain = Toy()
    plain(x).backward()
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()]))
    norms = {}
    for stage in (0, 2):
        cfg = load_config(
            overrides=[
                f"deepspeed.zero_stage={stage}",
                "deepspeed.precision=fp32",
                "max_steps=5",
                "optim.warmup_steps=1",
            ]
        )
        torch.manual_seed(0)
        engine = build_engine(Toy(), cfg, world_size=1)
        engine.backward(engine(x))
        own = unreported_grad_norm(engine)
        engine.step()
        reported = engine.get_global_grad_norm()
        assert (own is None) == (reported is not None), (stage, own, reported)
        norms[stage] = float(own if reported is None else reported)
    assert norms[0] == pytest.approx(expected, rel=1e-5) and norms[2] == pytest.approx(expected, rel=1e-5)
