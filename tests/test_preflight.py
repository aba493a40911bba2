"""Issue 13 (4, 6): outside dependencies and the shared run dir checked on every rank before the first step;
a failed evaluation is logged, counted and survived; rank 0 chooses the checkpoint every rank resumes from.

Single-rank faults go through a wrapper of ``ticod.train`` (``WRAPPER``) whose hooks act on one rank only,
as a node without Java or with its own local run dir would.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import DEMO, FAST, launch_module, minilm_dir, ok, run_killing_group, train_env, train_log

from ticod import checkpoint as ck
from ticod import distributed as D
from ticod import preflight
from ticod.config import EvalConfig, load_config

# ticod.train with per-rank faults, each set by an environment variable naming the rank:
#   PRIVATE_RUN_DIR_RANK  that rank gets run_dir=$PRIVATE_RUN_DIR (a node-local disk)
#   NO_JAVA_RANK          that rank has no java on PATH
#   FAIL_FIRST_EVAL       "metrics": computing the first evaluation's metrics raises (as a dying METEOR
#                         Java process does); "media": rank 0's first logging of eval images raises (a
#                         wandb upload error; the other ranks are past the evaluation's collectives);
#                         "predict": rank 1's first prediction loop raises (the other rank is about to
#                         wait for its records in the gather)
WRAPPER = """
import os, sys
from pathlib import Path

from ticod import evaluate, train, tracker

RANK = os.environ.get("RANK", "0")  # a single process gets its RANK later, from ticod.distributed
if os.environ.get("PRIVATE_RUN_DIR_RANK") == RANK:
    sys.argv.append("run_dir=" + os.environ["PRIVATE_RUN_DIR"])
if os.environ.get("NO_JAVA_RANK") == RANK:
    os.environ["PATH"] = str(Path(sys.executable).parent)


def fail_once(owner, name, error):
    real, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(error)
        return real(*args, **kwargs)

    setattr(owner, name, wrapped)


if os.environ.get("FAIL_FIRST_EVAL") == "metrics":
    fail_once(evaluate, "compute_metrics", "injected: METEOR's Java process died")
if os.environ.get("FAIL_FIRST_EVAL") == "media" and RANK == "0":
    fail_once(tracker.Tracker, "log_images", "injected: wandb media upload failed")
if os.environ.get("FAIL_FIRST_EVAL") == "predict" and RANK == "1":
    fail_once(evaluate, "_predict", "injected: CUDA out of memory while predicting")
if __name__ == "__main__":
    sys.exit(train.main())
"""
# Detection only: the in-loop evaluations need no Java (slow on 2 shared cores) and no BERTScore model.
EVAL_RUN = ["loss.task=detection", "max_steps=4", "eval.every=2", "eval.at_end=true", "eval.max_images=4"]
EVAL_RUN.append("data.eval_batch_size=2")


@pytest.fixture
def wrapper_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with the ``ticod_faults`` wrapper module."""
    (tmp_path / "ticod_faults.py").write_text(WRAPPER)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def run_wrapper_alone(overrides: list[str], env: dict[str, str]):
    """Like ``run_train`` (one process) but running the wrapper."""
    cmd = [sys.executable, "-m", "ticod_faults", "--config", str(DEMO), *FAST, *overrides]
    return run_killing_group(cmd, env=train_env(env), timeout=600)


# -------------------------------------------------------------------------------------- unit checks
def test_java_problem_names_the_missing_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if shutil.which("java"):
        assert preflight.java_problem() is None
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = preflight.java_problem()
    assert problem is not None and problem.startswith("java is not on PATH")


def test_bertscore_problem_resolves_without_loading_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A local model dir passes; a dir without weights, a missing path, a hub name absent from an offline
    cache and an unknown model without a layer are each named, before any weights are read."""
    import huggingface_hub.constants

    assert (
        preflight.bertscore_problem(EvalConfig(bertscore_model=minilm_dir(), bertscore_num_layers=6)) is None
    )
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(Path(minilm_dir()) / "config.json", only_config)
    missing = tmp_path / "missing"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    cases = {
        str(only_config): "no weights in a local dir",
        str(missing): "is neither a local dir nor a hub model name",
        "roberta-large": "no config.json in a local dir, the HF cache",
    }
    for model, expected in cases.items():
        problem = preflight.bertscore_problem(EvalConfig(bertscore_model=model, bertscore_num_layers=6))
        assert problem is not None and problem.startswith(f"eval.bertscore_model={model!r}")
        assert expected in problem and "eval.bertscore=false" in problem
    problem = preflight.bertscore_problem(EvalConfig(bertscore_model=str(only_config)))
    assert problem is not None and "set eval.bertscore_num_layers" in problem


def test_only_what_the_config_enables_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java
    missing = f"eval.bertscore_model={tmp_path / 'missing'}"
    assert preflight.dependency_problems(load_config(None, ["loss.task=detection", missing])) == []
    assert preflight.dependency_problems(load_config(None, ["eval.at_end=false", missing])) == []
    assert len(preflight.dependency_problems(load_config(None, ["eval.bertscore=false", missing]))) == 1
    assert len(preflight.dependency_problems(load_config(None, [missing]))) == 2


def test_a_tracker_that_cannot_start_is_a_preflight_error(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run_dir={tmp_path}", "eval.at_end=false", "logging.wandb.mode=online"])

    def start() -> None:
        raise RuntimeError("no network")

    with pytest.raises(preflight.PreflightError, match=r"tracker could not start .*online.*no network"):
        preflight.run_preflight(cfg, start)


# ------------------------------------------------------------------------------ 2 gloo ranks, no model
def _shared_worker(rank: int, port: int, root: str, queue) -> None:
    info = D.DistInfo(rank=rank, local_rank=rank, world_size=2, local_world_size=2, master_port=port)
    D.init_process_group(info, torch.device("cpu"), timeout_s=60)
    out: dict = {}
    try:
        shared, own = Path(root) / "shared", Path(root) / f"own{rank}"
        problems, token = preflight.shared_run_dir_problems(shared)
        out["shared"] = (problems, token is not None)
        dist.barrier()
        out["shared_left"] = sorted(p.name for p in shared.iterdir()) if rank == 0 else []
        try:  # each rank a directory of its own: as on nodes without a common filesystem
            preflight.agree(preflight.shared_run_dir_problems(own)[0])
        except preflight.PreflightError as e:
            out["own"] = str(e)
        # Each rank's own dir has a different latest checkpoint: rank 0's is the one every rank resumes from.
        out["resume"] = str(ck.resolve_resume_on_rank0("auto", own))
        try:
            ck.resolve_resume_on_rank0(str(own / "nothing"), own)
        except FileNotFoundError as e:
            out["bad_resume"] = str(e)
    finally:
        dist.destroy_process_group()
        queue.put((rank, out))


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / ck.CKPT_DIR / ck.checkpoint_name(step)
    path.mkdir(parents=True)
    (path / ck.STATE_FILE).write_text("{}")
    return path


@pytest.mark.slow
def test_two_ranks_prove_a_shared_run_dir_and_resume_from_rank0s_checkpoint(tmp_path: Path) -> None:
    chosen = _fake_checkpoint(tmp_path / "own0", 3)
    _fake_checkpoint(tmp_path / "own1", 5)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = D.free_port()
    procs = [ctx.Process(target=_shared_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # A shared dir: nothing to report, and rank 0's token file is its to delete (here, by the test).
    assert results[0]["shared"] == ([], True) and results[1]["shared"] == ([], False)
    assert [n.startswith(preflight.TOKEN_PREFIX) for n in results[0]["shared_left"]] == [True]
    # Private dirs: both ranks stop with the same message, which names rank 1 (the one that could not see).
    assert results[0]["own"] == results[1]["own"]
    pattern = rf"- {preflight.SHARED_RUN_DIR}: rank 0 wrote (\.preflight-\w+) into run_dir, but .*/own1/\1"
    assert re.fullmatch(pattern + r" is not there \[rank 1 \(.+\)\]", results[0]["own"]), results[0]["own"]
    assert results[0]["resume"] == results[1]["resume"] == str(chosen)
    assert results[0]["bad_resume"] == results[1]["bad_resume"]
    assert "not a complete TICOD checkpoint dir" in results[0]["bad_resume"]


# ---------------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_every_rank_stops_before_training_with_one_message(
    demo_shards_dir: Path, tmp_path: Path, wrapper_env: dict[str, str]
) -> None:
    """Rank 1 has a run dir of its own and no Java, the BERTScore model is missing everywhere and wandb
    online cannot reach its server on rank 0: both ranks exit 2 at start with one message naming every
    problem and its ranks, without waiting out the collective timeout (600 s, longer than the test's limit).
    """
    run, private = tmp_path / "run", tmp_path / "node1_local"
    env = {
        **wrapper_env,
        "PRIVATE_RUN_DIR_RANK": "1",
        "PRIVATE_RUN_DIR": str(private),
        "NO_JAVA_RANK": "1",
        # wandb online against a closed local port: the node without network, whatever this machine has.
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_API_KEY": "0" * 40,
        "WANDB_INIT_TIMEOUT": "5",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
    }
    overrides = [f"run_dir={run}", f"data.shards_dir={demo_shards_dir}", "max_steps=2"]
    overrides += ["eval.at_end=true", "eval.bertscore=true", f"eval.bertscore_model={tmp_path / 'no_model'}"]
    overrides += ["eval.bertscore_num_layers=6", "logging.wandb.mode=online", "deepspeed.dist_timeout_s=600"]
    proc = launch_module("ticod_faults", overrides, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "ERROR preflight failed, nothing was trained:" in ln]
    assert "[rank0]" in line  # rank 0 alone says it
    # One line per problem, with the ranks that have it.
    found = re.findall(r"^- (.*) \[rank (.*)\]$", proc.stderr, flags=re.M)
    ranks = {problem: re.findall(r"(\d+) \(", where) for problem, where in found}
    expected = {
        f"{preflight.SHARED_RUN_DIR}: rank 0 wrote {preflight.TOKEN_PREFIX}": ["1"],
        "java is not on PATH": ["1"],
        f"eval.bertscore_model={str(tmp_path / 'no_model')!r} is neither": ["0", "1"],
        "the tracker could not start (logging.wandb.mode=online)": ["0"],
    }
    assert len(ranks) == len(expected), proc.stderr[-6000:]
    for start, who in expected.items():
        assert [r for p, r in ranks.items() if p.startswith(start)] == [who], (start, found)
    assert "training " not in proc.stderr and not (run / "checkpoints").exists()
    assert not list(run.glob(f"{preflight.TOKEN_PREFIX}*"))
    assert "Timed out" not in proc.stderr


def test_a_failed_evaluation_is_counted_and_training_goes_on(
    demo_shards_dir: Path, tmp_path: Path, wrapper_env: dict[str, str]
) -> None:
    """The step-2 evaluation fails computing its metrics: logged with its traceback, counted as eval/failed,
    and the run trains to the end, exports, and evaluates again at the end."""
    run = tmp_path / "run"
    env = {**wrapper_env, "FAIL_FIRST_EVAL": "metrics"}
    proc = run_wrapper_alone([f"run_dir={run}", f"data.shards_dir={demo_shards_dir}", *EVAL_RUN], env)
    ok(proc)
    assert "evaluation at step 2 failed on rank 0; training goes on" in proc.stderr
    assert "RuntimeError: injected: METEOR's Java process died" in proc.stderr
    assert_survived(run, failed_at=2, scored=[4])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["media", "predict"])
def test_an_evaluation_failed_on_one_rank_is_survived_by_every_rank(
    demo_shards_dir: Path, tmp_path: Path, wrapper_env: dict[str, str], where: str
) -> None:
    """2 ranks, ZeRO-2: one rank alone fails in the step-2 evaluation: rank 0 logging its images (after the
    evaluation's collectives), or rank 1 predicting (before them); both ranks go on to the same steps,
    save, export and evaluate at the end."""
    run = tmp_path / "run"
    env = {**wrapper_env, "FAIL_FIRST_EVAL": where}
    common = [f"run_dir={run}", f"data.shards_dir={demo_shards_dir}", "deepspeed.zero_stage=2", *EVAL_RUN]
    proc = launch_module("ticod_faults", [*common, "deepspeed.dist_timeout_s=120"], env=env)
    ok(proc)
    if where == "media":
        assert "[rank0] ERROR evaluation at step 2 failed on rank 0" in proc.stderr
        assert "failed on rank 1" not in proc.stderr
        scored = [2, 4]  # the step-2 metrics were logged before the images
    else:
        assert "evaluation failed on rank 1 while predicting" in proc.stderr
        assert "prediction failed on rank 1: RuntimeError: injected: CUDA out of memory" in proc.stderr
        assert "Timed out" not in proc.stderr
        scored = [4]
    assert_survived(run, failed_at=2, scored=scored)


def assert_survived(run: Path, failed_at: int, scored: list[int]) -> None:
    """Steps 1-4 trained, one failed evaluation counted at ``failed_at``, metrics logged at the ``scored``
    steps (the final evaluation included), the export there."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_log(run)] == [1, 2, 3, 4]
    failed = [r for r in rows if "eval/failed" in r]
    assert [(r["step"], r["eval/failed"]) for r in failed] == [(failed_at, 1)]
    assert "injected: " in failed[0]["eval/error"]  # why it failed, in the run dir (not only in stderr)
    assert [r["step"] for r in rows if "eval/num_images" in r] == scored
    assert (run / "export" / "model.safetensors").is_file()
    state = json.loads((ck.latest_checkpoint(run) / ck.STATE_FILE).read_text())["train"]
    assert (state["step"], state["eval_failed"]) == (4, 1)
