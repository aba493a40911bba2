"""Sabotage check: break the package one line at a time and show that the tests notice.

``python tools/sabotage.py [--only NAME ...] [--list] [--out results.json] [--no-baseline] [--timeout S]``

Each row of ``SABOTAGES`` is a one-line change to ``ticod/`` (a regular expression that must match exactly
once in the package, and its replacement) and the tests that must fail because of it. The tool copies the
working tree (the files git tracks plus untracked ones it does not ignore) into a temporary directory,
first runs every named test there unchanged (the baseline: a test that fails anyway proves nothing), then
for each row makes a fresh copy, applies the row's change and runs ``python -m pytest -q TESTS`` in the
copy with ``PYTHONPATH`` set to it, after checking that ``import ticod`` there imports the copy and not the
editable install. A row is *caught* when every one of its tests fails (a parametrized test fails when
any of its cases does), *partly caught* when only some do, *survived* when all pass, and an *error* when
pytest could not run them (exit status 2-5: a collection or usage error, no tests) or timed out.

A pattern that matches no line, or more than one, stops the tool before anything runs: a stale sabotage
is reported as such, never as caught or survived. ``--list`` checks every pattern against the current
tree and exits. Prints a markdown table; ``--out`` also writes the results as JSON. Exit status 0 when
every row was caught, 1 otherwise, 2 when nothing could be judged (stale pattern, failing baseline).

Slow (the rows that need 2-rank training runs take minutes each) and not part of CI: run it before
resolving a change to core logic or to the tests that guard it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ticod"
# Never copied: environments, caches and run outputs (when the tree is not a git checkout).
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "demo_data", "wandb"}


@dataclass(frozen=True)
class Sabotage:
    """A one-line change to the package and the tests that must fail under it."""

    name: str
    what: str  # the claim it breaks, in words
    pattern: str  # regular expression (re.MULTILINE); must match exactly once in ticod/**/*.py
    replacement: str  # re.sub replacement (may use groups)
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root


SABOTAGES = (
    # -------------------------------------------------------------- the blind spots of issue 19
    Sabotage(
        "resume-off",
        "ticod.train ignores the checkpoint to resume from (starts over)",
        r"^([ \t]*\w+ = )[\w.]*resolve_resume\w*\([^()\n]*\)[ \t]*$",
        r"\1None",
        ("tests/test_train.py::test_resume_after_kill_is_exact",),
    ),
    Sabotage(
        "cascade-one-iou",
        "every cascade stage matches at iou_thresholds[0]",
        r"\(cfg, in_channels, num_classes, iou, stds\)",
        "(cfg, in_channels, num_classes, cfg.iou_thresholds[0], stds)",
        ("tests/test_model_cascade.py::test_each_stage_labels_rois_at_its_own_iou_threshold",),
    ),
    Sabotage(
        "stats-not-reset-after-replay",
        "the resumed train stream hands the replayed groups' stats to its first batch",
        r"^[ \t]*stats\.pop\(\)[ \t]*\n",
        "",
        (
            "tests/test_data_pipeline.py::test_train_stream_is_seeded_per_rank_and_resumable",
            "tests/test_data_bad.py::test_resumed_train_stream_counts_what_the_uninterrupted_one_counts",
        ),
    ),
    Sabotage(
        "nonfinite-flag-local",
        "step_flags skips its all-reduce: a NaN on one rank is skipped by that rank only",
        r"^([ \t]*)dist\.all_reduce\(flags, op=dist\.ReduceOp\.MAX\)[ \t]*$",
        r"\1pass",
        ("tests/test_reliability.py::test_nan_on_one_rank_is_skipped_by_every_rank",),
    ),
    Sabotage(
        "zero-never-updates",
        "ZeRO stages 1-3 train with learning rate 0 (weights never change)",
        r"^([ \t]*scheduler = build_scheduler\([^\n]*\))[ \t]*$",
        r"\1 if cfg.deepspeed.zero_stage == 0 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 0)",
        ("tests/test_train.py::test_zero_stages_two_ranks",),
    ),
    # ------------------------------------------------------------------------------ cascade
    Sabotage(
        "cascade-iou-defaults",
        "the default stage IoU thresholds are 0.5/0.5/0.5",
        r"iou_thresholds: list\[float\] = field\(default_factory=lambda: \[0\.5, 0\.6, 0\.7\]\)",
        "iou_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])",
        ("tests/test_config.py::test_cascade_stage_defaults",),
    ),
    Sabotage(
        "cascade-last-stage-scores",
        "inference scores come from the last stage instead of the mean over stages",
        r"scores = torch\.stack\(probs\)\.mean\(dim=0\)",
        "scores = probs[-1]",
        ("tests/test_model_cascade.py::test_inference_averages_stage_scores_and_takes_last_stage_boxes",),
    ),
    Sabotage(
        "cascade-no-gt-rois",
        "a stage samples its RoIs without the appended ground-truth boxes",
        r"candidates = \[torch\.cat\(\[p, gt\]\) for p, gt in zip\(proposals, gts, strict=True\)\]",
        "candidates = list(proposals)",
        (
            "tests/test_model_cascade.py::test_sampling_flags_gt_boxes_and_refinement_applies_the_stage_regression",
        ),
    ),
    # ------------------------------------------------------------------------------- losses
    Sabotage(
        "losses-stage-weights-ignored",
        "loss_det adds the cascade stages unweighted (1/0.5/0.25 ignored)",
        r"det = det \+ w \* \(",
        "det = det + (",
        ("tests/test_model_ticod.py::test_joint_losses_are_named_scalar_finite_and_weighted_once",),
    ),
    Sabotage(
        "losses-caption-weight-ignored",
        "the joint loss ignores λ (loss_det + loss_cap)",
        r"out\[\"loss\"\] = out\[\"loss_det\"\] \+ self\.caption_weight \* out\[\"loss_cap\"\]",
        'out["loss"] = out["loss_det"] + out["loss_cap"]',
        ("tests/test_model_ticod.py::test_joint_losses_are_named_scalar_finite_and_weighted_once",),
    ),
    # -------------------------------------------------------------------------- data stream
    Sabotage(
        "data-same-stream-every-rank",
        "every rank draws the same shards and shuffle order",
        r'f"\{seed\}:\{rank\}" if origin == 0\b',
        'f"{seed}" if origin == 0',
        ("tests/test_data_pipeline.py::test_train_stream_is_seeded_per_rank_and_resumable",),
    ),
    Sabotage(
        "data-lost-samples-not-read",
        "samples a truncated or unreadable shard lost are not counted as read",
        r"^([ \t]*)stats\.read \+= stop - first - n[ \t]*$",
        r"\1pass",
        ("tests/test_data_bad.py::test_eval_skips_and_counts_every_bad_sample",),
    ),
    # -------------------------------------------------------------- the blind spots of issue 24
    Sabotage(
        "box-loss-weight-dropped",
        "model.roi.box_loss_weight never reaches the loss (the Swin configs' GIoU x 10 becomes x 1)",
        r"list\(model_cfg\.roi\.stage_loss_weights\), model_cfg\.roi\.box_loss_weight$",
        "list(model_cfg.roi.stage_loss_weights)",
        ("tests/test_blind_spots.py::test_reference_box_loss_weight_reaches_the_combined_loss",),
    ),
    Sabotage(
        "python-rng-not-restored",
        "a resume restores torch's RNG but not Python's global random state",
        r"^([ \t]*)random\.setstate\(state\[\"python\"\]\)$",
        r"\1pass",
        ("tests/test_blind_spots.py::test_python_random_state_is_restored_at_resume",),
    ),
    Sabotage(
        "logged-lr-of-next-step",
        "train/lr is read after the optimizer step (the next step's lr, not the one applied)",
        r"^([ \t]*)\*\*window\.lrs,$",
        r"\1**step_lrs(engine.optimizer),",
        ("tests/test_logged_lr.py::test_logged_lrs_are_those_the_step_applied",),
    ),
    # --------------------------------------------------------------------------- checkpoint
    Sabotage(
        "checkpoint-rng-not-restored",
        "resuming reads the RNG file but does not set the RNG",
        r"set_rng_state\(torch\.load\(rng_file, weights_only=True\)\)",
        "torch.load(rng_file, weights_only=True)",
        ("tests/test_checkpoint.py::test_deepspeed_roundtrip",),
    ),
    Sabotage(
        "checkpoint-prune-all",
        "keep_last=0 prunes the newest checkpoint too",
        r"max\(0, len\(ckpts\) - max\(1, keep_last\)\)",
        "max(0, len(ckpts) - keep_last)",
        ("tests/test_checkpoint.py::test_prune_keeps_newest",),
    ),
    Sabotage(
        "checkpoint-latest-is-oldest",
        "--resume auto picks the oldest complete checkpoint",
        r"return ckpts\[-1\] if ckpts else None",
        "return ckpts[0] if ckpts else None",
        ("tests/test_checkpoint.py::test_latest_ignores_partial_and_unmarked",),
    ),
    # --------------------------------------------------------------------------- evaluation
    Sabotage(
        "eval-boxes-stay-xyxy",
        "COCO results get xyxy boxes instead of xywh",
        r'"bbox": \[x1, y1, x2 - x1, y2 - y1\]',
        '"bbox": [x1, y1, x2, y2]',
        ("tests/test_evaluate.py::test_records_and_coco_results_use_original_ids_and_xywh",),
    ),
    Sabotage(
        "eval-missing-images-allowed",
        "evaluation accepts predictions that miss images of the split",
        r"if unknown or len\(missing\) != bad_samples:",
        "if unknown:",
        ("tests/test_evaluate.py::test_dedupe_counts_every_image_exactly_once",),
    ),
    Sabotage(
        "eval-image-subset-ignored",
        "box AP of a subset counts the images not predicted as misses",
        r"^([ \t]*)coco_eval\.params\.imgIds = sorted\(set\(image_ids\)\)$",
        r"\1pass",
        ("tests/test_metrics_detection.py::test_image_subset_ignores_images_not_predicted",),
    ),
    # ------------------------------------------------------- issue 14: input pipeline and step loop
    Sabotage(
        "aspect-groups-scale-per-sample",
        "a grouped batch draws each image's scale on its own (sizes differ again: padding)",
        r"min_size = group_rng\.choice\(self\.process\.min_sizes\) if self\.group_by_aspect else None",
        "min_size = None",
        ("tests/test_data_pipeline.py::test_grouped_stream_one_bucket_one_scale_per_batch_and_resumable",),
    ),
    Sabotage(
        "uint8-padding-not-zeroed",
        "the model normalises the padding of a uint8 batch too (it was 0 after normalising)",
        r"^([ \t]*)x\[i, :, h:\] = 0$",
        r"\1pass",
        ("tests/test_input_normalisation.py::test_model_sees_the_normalised_zero_padded_batch_of_before",),
    ),
    Sabotage(
        "resume-never-seeks",
        "a resumed stream replays everything drawn before, though the manifest has byte offsets",
        r"if skip and self\.seekable:",
        "if skip and False:",
        ("tests/test_data_pipeline.py::test_resume_seeks_reading_only_what_the_stream_holds",),
    ),
    Sabotage(
        "eval-every-stream-reads-all",
        "every eval stream reads the whole split (and scores every image)",
        r"lo, hi = total \* stream // streams, total \* \(stream \+ 1\) // streams",
        "lo, hi = 0, total",
        ("tests/test_data_pipeline.py::test_eval_shares_score_every_image_once_and_read_each_byte_once",),
    ),
    Sabotage(
        "predict-skips-exif",
        "predict decodes files without their EXIF rotation (eval applies it)",
        r"return decode_rgb\(path\.read_bytes\(\)\)",
        'return Image.open(path).convert("RGB")',
        ("tests/test_predict.py::test_predict_on_exif_rotated_jpeg_matches_eval_from_a_shard",),
    ),
    # ------------------------------------------------ issue 15: reference fidelity and precision
    Sabotage(
        "giou-on-encoded-deltas",
        "the GIoU box loss compares the raw deltas with the GT boxes instead of decoding them",
        r"boxes = self\.box_coder\.decode_single\(deltas, proposals\[pos\]\)",
        "boxes = deltas",
        ("tests/test_model_cascade.py::test_box_loss_on_the_gt_class_deltas",),
    ),
    Sabotage(
        "box-deltas-of-class-0",
        "class-specific regression reads the background's deltas for every positive",
        r"deltas\[pos, torch\.zeros_like\(pos\) if self\.class_agnostic else labels\[pos\]\]",
        "deltas[pos, torch.zeros_like(pos)]",
        ("tests/test_model_cascade.py::test_box_loss_on_the_gt_class_deltas",),
    ),
    Sabotage(
        "roi-align-unaligned",
        "the CPU RoIAlign samples half a feature pixel up-left (aligned=False)",
        r"\* scale\[:, None\] - 0\.5\)\.unbind\(1\)",
        "* scale[:, None]).unbind(1)",
        ("tests/test_roi_align.py::test_matches_torchvision_aligned",),
    ),
    Sabotage(
        "swin-stage-norms-skipped",
        "the Swin stage outputs reach the FPN without their LayerNorm",
        r'getattr\(self, f"norm\{i\}"\)\(f\)\.permute',
        "f.permute",
        ("tests/test_model_backbone.py::test_stage_outputs_are_layer_normed",),
    ),
    Sabotage(
        "anchors-in-feature-dtype",
        "anchors are built in the feature maps' dtype (bf16 under autocast)",
        r"return super\(\)\.forward\(image_list, shapes\)",
        "return super().forward(image_list, feature_maps)",
        ("tests/test_precision.py::test_anchors_box_coding_and_rois_are_fp32_under_bf16_autocast",),
    ),
    Sabotage(
        "fp16-accepted",
        "deepspeed.precision=fp16 passes the config check (and crashes in roi_align)",
        r"if cfg\.deepspeed\.precision == Precision\.fp16:",
        "if False:",
        ("tests/test_precision.py::test_fp16_is_refused_with_the_alternatives",),
    ),
    # -------------------------------------------------------------- issue 16: partial labels, mixes
    Sabotage(
        "tasks-ignored",
        "every sample counts as labelled for boxes, whatever its shard record says",
        r'return "boxes" in tasks, "captions" in tasks and bool\(record\.get\("captions"\)\)',
        'return True, bool(record.get("captions"))',
        (
            "tests/test_data_coco.py::test_record_tasks",
            "tests/test_data_sources.py::test_mix_batches_carry_labels_per_source_merged_categories_and_counts",
        ),
    ),
    Sabotage(
        "detector-on-unlabelled-images",
        "the detector trains on every image of the batch, captions-only ones as all background",
        r'rows = labelled_rows\(has_boxes, len\(sizes\), "has_boxes"\)',
        "rows = None",
        (
            "tests/test_model_ticod.py::test_a_task_without_labels_in_the_batch_has_zero_loss_and_zero_gradient",
            "tests/test_model_ticod.py::test_mixed_batch_losses_equal_those_of_the_labelled_images_alone",
        ),
    ),
    Sabotage(
        "caption-loss-on-uncaptioned-rows",
        "the caption loss also trains on the empty captions of images without one",
        r"for i in uncaptioned\[1:\] if stand_in else uncaptioned:",
        "for i in []:",
        ("tests/test_model_ticod.py::test_mixed_batch_losses_equal_those_of_the_labelled_images_alone",),
    ),
    Sabotage(
        "detector-stand-in-counts",
        "a batch without box labels trains the detector on a stand-in image as all background",
        r"losses = \{name: loss \* 0 for name, loss in losses\.items\(\)\}",
        "losses = dict(losses)",
        (
            "tests/test_model_ticod.py::test_a_task_without_labels_in_the_batch_has_zero_loss_and_zero_gradient",
        ),
    ),
    Sabotage(
        "absent-task-weight-pulled",
        "with learned task weights, a task without labels in the batch still pulls its log-variance",
        r"out\[\"loss\"\] = \(det if present\[0\] else det \* 0\) \+ \(cap if present\[1\] else cap \* 0\)",
        'out["loss"] = det + cap',
        ("tests/test_model_ticod.py::test_learned_task_weight_of_an_absent_task_gets_no_gradient",),
    ),
    Sabotage(
        "mix-weights-ignored",
        "data.sources' weights are not passed to the streams (shards drawn uniformly)",
        r"weights = shard_weights\(sizes, \[src\.weight for src in sources\]\)\.tolist\(\)",
        "weights = None",
        (
            "tests/test_data_sources.py::test_mix_batches_carry_labels_per_source_merged_categories_and_counts",
        ),
    ),
    Sabotage(
        "shards-drawn-by-size",
        "one source draws shards by size: a short last shard's samples come less often",
        r"self\.p = \(self\.sizes > 0\) / \(self\.sizes > 0\)\.sum\(\)",
        "self.p = self.sizes / self.sizes.sum()",
        (
            "tests/test_data_sources.py::test_one_source_draws_every_shard_equally_often_the_short_last_one_too",
        ),
    ),
    Sabotage(
        "category-map-ignored",
        "data.category_map does not rename: differently spelt categories become new classes",
        r"renames = mapping\.get\(name, \{\}\)",
        "renames = {}",
        (
            "tests/test_data_sources.py::test_label_space_merges_by_name_renames_with_the_map_and_names_unknowns",
            "tests/test_data_sources.py::test_mix_batches_carry_labels_per_source_merged_categories_and_counts",
        ),
    ),
    Sabotage(
        "karpathy-without-restval",
        "the Karpathy train split leaves out restval (82,783 instead of 113,287 images)",
        r'"train": \("train", "restval"\)',
        '"train": ("train",)',
        ("tests/test_shard_coco.py::test_karpathy_captions_only_sizes_from_jpeg_headers",),
    ),
    Sabotage(
        "eval-boxes-on-unlabelled-images",
        "the ground truth holds images not labelled for boxes: their detections count as false positives",
        r"        if not has_boxes:\n            continue\n",
        "",
        (
            "tests/test_data_coco.py::test_ground_truth_scores_each_task_only_on_the_images_labelled_for_it",
            # Needs the real COCO sample: run with TICOD_COCO_SAMPLE=.../coco_sample (the copy has no ../shared).
            "tests/test_train_mix.py::test_partial_label_mix_trains_and_reports_each_source",
        ),
    ),
    # ------------------------------------------------------- issue 27: a damaged byte costs one sample
    Sabotage(
        "damaged-sample-ends-the-shard",
        "a damaged tar header ends the read of its shard (the rest of it lost)",
        r"yield i, sample, None if sample is not None else DAMAGED_SAMPLE",
        "yield i, sample, None if sample is not None else DAMAGED_SAMPLE\n            if sample is None:\n                return",
        ("tests/test_data_damage.py::test_evaluation_reads_every_other_image_of_the_damaged_shard",),
    ),
    Sabotage(
        "lost-sample-leaves-the-stream",
        "a lost sample is dropped from the stream instead of keeping its place: a resume shifts",
        r"^([ \t]*)yield shard\.offset \+ index, sample$",
        r"\1if sample is not None:\n\1    yield shard.offset + index, sample",
        (
            "tests/test_data_damage.py::test_resume_stays_exact_with_the_damage_before_and_after_the_resume_point",
        ),
    ),
)


@dataclass
class Result:
    """What one row did to the package and how its tests took it."""

    name: str
    what: str
    file: str
    line: int
    tests: list[str]
    before: str  # the line as it is
    after: str  # the line sabotaged ("" when deleted)
    result: str = "not run"  # caught | partly caught | survived | error
    failed: list[str] = field(default_factory=list)  # node ids of the tests that failed (or errored)
    summary: list[str] = field(default_factory=list)  # their lines in pytest's short summary (the reason)
    seconds: float = 0.0


class StaleSabotage(RuntimeError):
    """A pattern matches no line of the package, or more than one."""


def locate(tree: Path, sab: Sabotage) -> tuple[Path, re.Match[str]]:
    """The one file of ``tree/ticod`` where ``sab.pattern`` matches, and the match."""
    found = []
    for path in sorted((tree / PACKAGE).rglob("*.py")):
        found += [(path, m) for m in re.finditer(sab.pattern, path.read_text(), re.MULTILINE)]
    if len(found) != 1:
        where = ", ".join(f"{p.relative_to(tree)}:{line_of(m)}" for p, m in found) or "nowhere"
        raise StaleSabotage(
            f"sabotage {sab.name!r}: pattern {sab.pattern!r} must match exactly once in "
            f"{PACKAGE}/**/*.py, matches {len(found)} times ({where}); update it in {Path(__file__).name}"
        )
    return found[0]


def line_of(m: re.Match[str]) -> int:
    return m.string.count("\n", 0, m.start()) + 1


def sabotaged(m: re.Match[str], sab: Sabotage) -> str:
    """The text of the file ``m`` matched in, with ``sab`` applied."""
    return m.string[: m.start()] + m.expand(sab.replacement) + m.string[m.end() :]


def changed_line(m: re.Match[str], sab: Sabotage) -> tuple[str, str]:
    """The matched line before and after the sabotage (stripped; empty after: the line is deleted)."""
    start = m.string.rfind("\n", 0, m.start()) + 1
    end = m.string.find("\n", m.end() - 1 if m.group().endswith("\n") else m.end())
    after_end = end + len(sabotaged(m, sab)) - len(m.string)
    return m.string[start:end].strip(), sabotaged(m, sab)[start:after_end].strip()


def apply(tree: Path, sab: Sabotage) -> None:
    path, m = locate(tree, sab)
    path.write_text(sabotaged(m, sab))


def source_files(root: Path) -> list[Path]:
    """The working tree's files: git's tracked and untracked-but-not-ignored ones, or a plain walk."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        files = [Path(p.decode()) for p in out.split(b"\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [
            p.relative_to(root)
            for p in root.rglob("*")
            if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts)
        ]
    return [f for f in files if (root / f).is_file()]  # not the deleted ones git still tracks


def snapshot(dest: Path) -> Path:
    for rel in source_files(ROOT):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def copy_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    return env


def check_imports_copy(tree: Path) -> None:
    """``import ticod`` in the copy's environment must import the copy (not the editable install)."""
    out = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
        cwd=tree,
        env=copy_env(tree),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if Path(out).resolve() != (tree / PACKAGE / "__init__.py").resolve():
        raise RuntimeError(
            f"in the copy {tree}, `import {PACKAGE}` imports {out}: the sabotage would not apply"
        )


def run_pytest(tree: Path, tests: list[str], *, timeout: float) -> tuple[int, str]:
    """Exit status and output of pytest on ``tests`` in ``tree``; its whole process group is killed after."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(
        cmd,
        cwd=tree,
        env=copy_env(tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        out, status = f"timed out after {timeout:.0f} s", -1
    finally:
        with contextlib.suppress(ProcessLookupError):  # training ranks, loader workers left behind
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    return status, out


def summary_lines(output: str) -> list[str]:
    """The FAILED and ERROR lines of pytest's short summary (``-ra`` in pyproject.toml)."""
    return [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]


def node_id(summary_line: str) -> str:
    return summary_line.split(" ", 1)[1].split(" - ")[0]


def verdict(status: int, tests: list[str], failed: list[str]) -> str:
    """caught / partly caught / survived / error, from pytest's exit status and failed node ids."""
    if status not in (0, 1):
        return "error"
    hit = [t for t in tests if any(f == t or f.startswith(f"{t}[") for f in failed)]
    if status == 0 or not hit:
        return "survived" if status == 0 else "error"  # failures, but none of the named tests
    return "caught" if len(hit) == len(tests) else "partly caught"


def table(results: list[Result]) -> str:
    rows = [
        "| sabotage | one-line change | where | tests that must catch it | result | failing test |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        failed = "<br>".join(f.removeprefix("tests/") for f in r.failed)
        tests = "<br>".join(t.split("::")[-1] for t in r.tests)
        rows.append(f"| {r.name} | {r.what} | {r.file}:{r.line} | {tests} | {r.result} | {failed or '-'} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run only this row (repeatable)")
    p.add_argument(
        "--list", action="store_true", help="check every pattern against the tree, list the rows, exit"
    )
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--no-baseline", action="store_true", help="skip the unsabotaged run of the tests")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run (default 3600)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (their path is printed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = list(SABOTAGES)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in SABOTAGES})
        if unknown:
            print(f"error: unknown sabotage(s) {unknown}; --list shows them", file=sys.stderr)
            return 2
        chosen = [s for s in SABOTAGES if s.name in args.only]
    try:
        where = {s.name: locate(ROOT, s) for s in chosen}  # every pattern is current, before anything runs
    except StaleSabotage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    for s in chosen:
        path, m = where[s.name]
        before, after = changed_line(m, s)
        results.append(
            Result(s.name, s.what, str(path.relative_to(ROOT)), line_of(m), list(s.tests), before, after)
        )
    if args.list:
        for s, r in zip(chosen, results, strict=True):
            print(f"{s.name}: {s.what}\n  {r.file}:{r.line}\n  - {r.before}\n  + {r.after}")
            print(f"  caught by: {' '.join(s.tests)}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="ticod-sabotage-"))
    try:
        pristine = snapshot(work / "pristine")
        check_imports_copy(pristine)
        if not args.no_baseline:
            tests = sorted({t for s in chosen for t in s.tests})
            print(f"baseline: {len(tests)} test(s) unchanged ...", flush=True)
            t0 = time.monotonic()
            status, out = run_pytest(pristine, tests, timeout=args.timeout)
            if status != 0:
                print(out[-6000:], file=sys.stderr)
                print(f"error: the tests fail without any sabotage (pytest exit {status})", file=sys.stderr)
                return 2
            print(f"baseline: all pass ({time.monotonic() - t0:.0f} s)", flush=True)
        for s, r in zip(chosen, results, strict=True):
            tree = work / s.name
            shutil.copytree(pristine, tree)
            apply(tree, s)
            check_imports_copy(tree)
            print(f"{s.name}: {r.file}:{r.line} ...", end=" ", flush=True)
            t0 = time.monotonic()
            status, out = run_pytest(tree, r.tests, timeout=args.timeout)
            r.seconds = round(time.monotonic() - t0, 1)
            r.summary = summary_lines(out)
            r.failed = [node_id(line) for line in r.summary]
            r.result = verdict(status, r.tests, r.failed)
            if r.result == "error":
                print(out[-3000:], file=sys.stderr)
            print(f"{r.result} ({r.seconds:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
    finally:
        if args.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    bad = [r.name for r in results if r.result != "caught"]
    if bad:
        print(f"\nnot caught: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
