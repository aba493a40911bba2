"""Preflight: before the first step, every rank checks what the run will need, and all ranks agree.

What is checked (only what the config enables):

* ``run_dir`` is on a filesystem every node sees: rank 0 writes a file named by a random token, every
  rank must read it back (checkpoints, resume and the export all assume one shared ``run_dir``);
* Java, for pycocoevalcap's PTB tokenizer and METEOR (caption metrics in any evaluation);
* the BERTScore model (``eval.bertscore_model``): its config and weights exist in the local dir, the HF
  cache or on the hub, checked without downloading the weights;
* the tracker (wandb ``init`` on rank 0, e.g. ``online`` on a node without network).

A problem on any rank stops every rank at the same point with one :class:`PreflightError` listing each
problem and the ranks that have it, instead of one rank raising hours later (the first evaluation) or at
start while the others wait in their next collective until ``deepspeed.dist_timeout_s``.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ticod import distributed
from ticod.config import Config, EvalConfig, Task

T = TypeVar("T")

SHARED_RUN_DIR = "run_dir must be on a filesystem every node sees"
TOKEN_PREFIX = ".preflight-"
# How long a rank looks for rank 0's token file: lets a network filesystem's attribute cache catch up,
# well inside the minute in which a job on an unshared run_dir must stop.
TOKEN_WAIT_S = 10.0
# METEOR starts Java with this heap; the check reserves the same.
METEOR_HEAP = "-Xmx2G"


class PreflightError(RuntimeError):
    """Something the run needs is missing on at least one rank; raised on every rank alike."""


def _world() -> tuple[int, int]:
    return distributed.rank(), distributed.world_size()


def agree(problems: list[str]) -> None:
    """Raise :class:`PreflightError` on every rank when any rank found a problem (a collective).

    The message has one line per distinct problem, ``- <problem> [rank R (host), ...]``.
    """
    _, world_size = _world()
    gathered = distributed.gather_objects((socket.gethostname(), problems))
    where: dict[str, list[str]] = {}
    for r, (host, found) in enumerate(gathered):
        for problem in found:
            where.setdefault(" ".join(problem.split()), []).append(f"{r} ({host})")  # one line each
    if where:
        lines = [
            f"- {p} [rank {', '.join(ranks)}]" if world_size > 1 else f"- {p}" for p, ranks in where.items()
        ]
        raise PreflightError("\n".join(lines))


def shared_run_dir_problems(run_dir: Path) -> tuple[list[str], Path | None]:
    """Whether this rank sees the file rank 0 just wrote into ``run_dir`` (a collective; no-op alone).

    Returns:
        This rank's problems, and on rank 0 the token file to delete once every rank has looked.
    """
    rank, world_size = _world()
    if world_size == 1:
        return [], None
    problems: list[str] = []
    token: str | None = None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            candidate = secrets.token_hex(16)
            (run_dir / f"{TOKEN_PREFIX}{candidate}").write_text(candidate)
            token = candidate
        except OSError as e:
            problems.append(f"rank 0 cannot write to run_dir {run_dir}: {e}")
    token = distributed.broadcast_from_rank0(token)  # after the write: the file exists before any rank looks
    if token is None:
        return problems, None
    path = run_dir / f"{TOKEN_PREFIX}{token}"
    if not _sees(path, token):
        problems.append(f"{SHARED_RUN_DIR}: rank 0 wrote {path.name} into run_dir, but {path} is not there")
    return problems, path if rank == 0 else None


def _sees(path: Path, token: str) -> bool:
    deadline = time.monotonic() + TOKEN_WAIT_S
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def evaluates_captions(cfg: Config) -> bool:
    """Whether any evaluation of this run scores captions (the model has a captioner)."""
    evaluates = cfg.eval.every > 0 or cfg.eval.at_start or cfg.eval.at_end
    return evaluates and cfg.loss.task != Task.detection


def java_problem() -> str | None:
    """Why pycocoevalcap's PTB tokenizer and METEOR cannot run here, or None."""
    from pycocoevalcap.meteor import meteor
    from pycocoevalcap.tokenizer import ptbtokenizer

    java = shutil.which("java")
    if java is None:
        return (
            "java is not on PATH: caption metrics (pycocoevalcap's PTB tokenizer and METEOR) run Java; "
            "install a Java runtime on every node (e.g. apt install default-jre-headless, or module load java)"
        )
    jars = [
        Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR,
        Path(meteor.__file__).parent / meteor.METEOR_JAR,
    ]
    missing = [str(j) for j in jars if not j.is_file()]
    if missing:
        return f"pycocoevalcap is incomplete, missing {', '.join(missing)}: reinstall pycocoevalcap"
    try:
        proc = subprocess.run([java, METEOR_HEAP, "-version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{java} {METEOR_HEAP} -version failed: {e}"
    if proc.returncode != 0:
        return f"{java} {METEOR_HEAP} -version (as METEOR starts Java) failed: {proc.stderr.strip()[-300:]}"
    return None


def bertscore_problem(cfg: EvalConfig) -> str | None:
    """Why ``eval.bertscore_model`` cannot load, or None: its config and weights file must exist in the
    local dir, the HF cache (also under ``HF_HUB_OFFLINE=1``) or on the hub; nothing large is downloaded."""
    from bert_score.utils import model2layers
    from transformers.utils import (
        CONFIG_NAME,
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )
    from transformers.utils.hub import has_file

    model = cfg.bertscore_model
    fix = (
        "set eval.bertscore_model to a local HF model dir (with eval.bertscore_num_layers), put the model "
        "in the HF cache of every node, or set eval.bertscore=false"
    )
    if (
        not cfg.bertscore_num_layers and model not in model2layers
    ):  # as ticod.metrics.captioning.load_bertscorer
        return f"eval.bertscore_model={model!r} has no default layer in bert-score: set eval.bertscore_num_layers"
    try:
        has_config = has_file(model, CONFIG_NAME)
        has_weights = any(
            has_file(model, name)
            for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
        )
    except OSError as e:  # e.g. not a repo on the hub, or a gated one
        return f"eval.bertscore_model={model!r} cannot be loaded ({e}); {fix}"
    except ValueError:  # huggingface_hub's HFValidationError: a path that is not there
        return f"eval.bertscore_model={model!r} is neither a local dir nor a hub model name; {fix}"
    if not (has_config and has_weights):
        what = "weights" if has_config else CONFIG_NAME
        return f"eval.bertscore_model={model!r}: no {what} in a local dir, the HF cache or on a reachable hub; {fix}"
    return None


def dependency_problems(cfg: Config) -> list[str]:
    """What this rank lacks of the programs and models the config's evaluations need."""
    if not evaluates_captions(cfg):
        return []
    problems = [java_problem()]
    if cfg.eval.bertscore:
        problems.append(bertscore_problem(cfg.eval))
    return [p for p in problems if p]


def run_preflight(cfg: Config, start_tracker: Callable[[], T]) -> T:
    """Check the shared run dir, this rank's dependencies and the tracker on every rank; all ranks agree.

    Call on every rank before the first step (a collective).

    Args:
        cfg: The run's config; only what it enables is checked.
        start_tracker: Makes the run's tracker (wandb ``init`` on rank 0); its failure is a problem too.

    Returns:
        The started tracker.

    Raises:
        PreflightError: on every rank alike, when any rank found a problem.
    """
    problems, token_file = shared_run_dir_problems(Path(cfg.run_dir))
    problems += dependency_problems(cfg)
    tracker: Any = None
    try:
        tracker = start_tracker()
    except Exception as e:  # any failure of wandb.init: reported by every rank below, not by rank 0 alone
        mode = cfg.logging.wandb.mode.value
        problems.append(
            f"the tracker could not start (logging.wandb.mode={mode}): {type(e).__name__}: {e}; without "
            "network on the nodes use logging.wandb.mode=offline and `wandb sync` the run dir later"
        )
    try:
        agree(problems)
    except PreflightError:
        if tracker is not None:
            tracker.close()
        raise
    finally:
        if token_file is not None:
            token_file.unlink(missing_ok=True)  # every rank has looked (agree is a collective)
    return tracker
