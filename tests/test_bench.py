"""The measuring parts of tools/bench/*.py: peak memory, alternation, ratios and targets (no timings asserted)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, load_tool

bench = load_tool("bench/common")
CPU = torch.device("cpu")
MIB = 2**20


def test_peak_memory_counts_tensor_bytes_above_the_start_exactly():
    before = torch.ones(MIB // 4)  # allocated before: not counted

    def work() -> torch.Tensor:
        a = torch.empty(MIB // 4)  # 1 MiB of float32
        b = torch.empty(2 * MIB // 4)  # +2 MiB: the peak, 3 MiB
        del a
        c = torch.empty(MIB // 8)  # 0.5 MiB while 2 MiB are held: below the peak
        return b.sum() + c.sum()

    _, peak = bench.peak_memory(work, CPU)
    assert peak == 3 * MIB
    assert before.numel() == MIB // 4


def test_alternate_warms_up_then_rotates_the_order_each_round():
    calls: list[str] = []

    def side(name: str, value: float):
        def run() -> float:
            calls.append(name)
            return value

        return run

    values = bench.alternate(
        {"a": side("a", 1.0), "b": side("b", 2.0), "c": side("c", 3.0)}, repeats=3, warmup=1
    )
    assert values == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_rows_ratio_of_medians_and_targets():
    rows = [bench.Row("base", [2.0, 4.0, 100.0], "s"), bench.Row("x", [1.0, 2.0, 3.0], "s", "base")]
    table = bench.format_table("t", rows)
    assert rows[1].ratio == 0.5 and "0.500 × base" in table
    assert bench.Target("lower", 0.5, 0.5, higher_is_better=False).passed
    assert not bench.Target("higher", 0.49, 0.5, higher_is_better=True).passed


def test_quality_reads_a_detection_only_run_without_captions(tmp_path):
    """loss.task=detection writes an empty captions.json: its caption metrics are NaN, its AP is read."""
    quality = load_tool("bench/quality")
    step = tmp_path / "eval" / "step_00000600"
    step.mkdir(parents=True)
    (step / "metrics.json").write_text('{"AP": 0.83}')
    (step / "captions.json").write_text("[]")
    out = quality.val_metrics(tmp_path, tmp_path / "shards")
    assert out["AP"] == 0.83 and out["images"] == 0 and out["top_caption"] == ""
    assert all(out[k] != out[k] for k in ("CIDEr", "distinct", "grounding_gap"))  # NaN


def test_quality_heldout_reads_an_evaluated_run_and_counts_its_distinct_captions(tmp_path):
    """An evaluated held-out set is read, not evaluated again; a detection-only run's captions are NaN."""
    quality = load_tool("bench/quality")
    out = tmp_path / "heldout"
    out.mkdir()
    (out / "metrics.json").write_text('{"AP": 0.8, "CIDEr": 1.1, "BERTScore-F1": 0.66}')
    (out / "captions.json").write_text(
        '[{"caption": "a red star"}, {"caption": "a red star"}, {"caption": "a cube"}]'
    )
    got = quality.heldout_metrics(tmp_path, tmp_path / "no_shards")
    assert got == {"AP": 0.8, "CIDEr": 1.1, "BERTScore-F1": 0.66, "distinct": 2.0, "images": 3}
    (out / "captions.json").write_text("[]")
    (out / "metrics.json").write_text('{"AP": 0.8}')
    got = quality.heldout_metrics(tmp_path, tmp_path / "no_shards")
    assert got["AP"] == 0.8 and got["images"] == 0 and all(got[k] != got[k] for k in ("CIDEr", "distinct"))


def test_run_in_own_group_kills_what_the_command_started_on_a_timeout(tmp_path):
    """A launcher killed alone leaves its ranks running (the opt-in COCO test's pytest timeout did)."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        bench.run_in_own_group(["bash", "-c", script], log=tmp_path / "log", timeout=2)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the command's child outlived it"
    assert bench.run_in_own_group(["bash", "-c", "echo hi; exit 3"], log=tmp_path / "log2") == 3
    assert (tmp_path / "log2").read_text() == "hi\n"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by its reparented parent, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_coco_overfit_reports_every_metric_its_opt_in_test_checks(monkeypatch):
    """tests/test_coco_overfit.py (not in CI) reads these from the benchmark's result: one it did not
    report (``distinct_captions``) failed that test with a KeyError after a 20-min run."""
    monkeypatch.syspath_prepend(str(ROOT / "tools" / "bench"))  # the benchmark imports its common.py
    overfit = load_tool("bench/coco_overfit")
    assert {"AP", "BLEU-4", "distinct_captions"} <= set(overfit.REPORTED)
