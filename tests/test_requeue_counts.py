"""The run totals add up across a requeue (issue 25, defect 8): a checkpoint saved between two log lines holds
the open log window's counts (samples trained on, read, bad), so the resumed run does not lose them."""

from __future__ import annotations

from helpers import ok, run_train, train_log

from ticod import checkpoint as ck


def test_a_save_between_log_steps_keeps_the_window_counts_across_a_requeue(demo_shards_dir, tmp_path):
    """Log every 4 steps, save at step 3 (between log lines), die there, resume and finish 6 steps of 2
    images: the run totals (trained on, read, bad) are those of one uninterrupted run."""

    def args(run) -> list[str]:
        return [
            f"run_dir={run}",
            f"data.shards_dir={demo_shards_dir}",
            "deepspeed.zero_stage=0",
            "max_steps=6",
            "logging.log_every=4",
            "checkpoint.save_every=3",
        ]

    whole, requeued = tmp_path / "whole", tmp_path / "requeued"
    ok(run_train(args(whole)))
    killed = run_train([*args(requeued), "faults.kill_at_step=3"])
    assert killed.returncode != 0
    assert train_log(requeued) == []  # no log line before the save
    saved = ck.read_trainer_state(requeued / ck.CKPT_DIR / ck.checkpoint_name(3))["train"]
    at_3 = ck.read_trainer_state(whole / ck.CKPT_DIR / ck.checkpoint_name(3))["train"]
    assert saved["samples"] == 6 and saved["samples_read"] > 0
    assert [at_3[k] for k in ("samples", "samples_read", "bad")] == [
        saved[k] for k in ("samples", "samples_read", "bad")
    ]

    ok(run_train([*args(requeued), "--resume", "auto"]))
    totals = [
        ck.read_trainer_state(run / ck.CKPT_DIR / ck.checkpoint_name(6))["train"] for run in (whole, requeued)
    ]
    assert [t["samples"] for t in totals] == [12, 12]
    assert totals[1]["samples_read"] == totals[0]["samples_read"] and totals[1]["bad"] == totals[0]["bad"]
    assert [(r["step"], r["train/samples"]) for r in train_log(requeued)] == [(4, 8), (6, 12)]
