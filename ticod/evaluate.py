"""Evaluation: COCO box AP and caption metrics of a model on a finite split, on any number of ranks.

``python -m ticod.evaluate --checkpoint PATH [--data SHARDS_DIR] [--split val] [--out DIR] [key=value ...]``
runs alone or under torchrun / srun (every rank evaluates its share of the split). Training calls
:func:`run_evaluation` every ``eval.every`` steps with the same code (:class:`Evaluator`).

Each rank runs its own share of the eval stream (shares may be uneven, some even empty); the per-image
predictions are then gathered to rank 0, which checks that every image was counted exactly once,
computes the metrics and writes ``metrics.json``, ``detections.json`` (COCO results format: original
image ids, original category ids, xywh in original image pixels) and ``captions.json``. Rank 0
broadcasts the metrics, or its error, so every rank returns or raises alike.

With ``synced`` (weights partitioned across ranks, as ZeRO-3 does: every module forward all-gathers its
weights, a collective) the ranks run the model in lockstep instead: one forward per step on every rank,
on a dummy image where a rank has no images left, and caption generation goes on until every rank's
captions are done. Without it there is no collective inside the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ticod import distributed
from ticod import engine as engine_lib
from ticod.caption_page import write_caption_page
from ticod.config import Config, ConfigError, EvalConfig, Precision, to_dict
from ticod.data.spec import EvalSplit, eval_splits
from ticod.ground_truth import GroundTruth, load_ground_truth, subset
from ticod.metrics.captioning import caption_metrics, load_bertscorer
from ticod.metrics.detection import detection_metrics
from ticod.metrics.per_class import PER_CLASS_CSV, describe_worst, write_per_class_csv
from ticod.metrics.per_class import table as per_class_table
from ticod.visualize import draw_predictions

if TYPE_CHECKING:
    from ticod.data.samples import Batch
    from ticod.tracker import Tracker

log = logging.getLogger("ticod")

# Sample images for wandb show only confident boxes: at score threshold 0 an image has up to 100 boxes.
SAMPLE_MIN_SCORE = 0.3
UNSCORED = "skipped: the split has no labels (results files only)"
# Side of the all-zero image a rank without images runs the model on while other ranks still have some.
DUMMY_IMAGE_SIZE = 32


class EvalCountError(RuntimeError):
    """The gathered predictions do not cover the split exactly once."""


@dataclass
class EvalResult:
    """Metrics (same on every rank) and, on rank 0, rendered sample predictions for wandb."""

    metrics: dict[str, Any]
    sample_images: list[tuple[Image.Image, str]] = field(default_factory=list)
    # wandb tables on rank 0: key (under eval/) -> (columns, rows); a cell may be a PIL image.
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- predictions
def to_records(
    outputs: list[dict[str, Any]], meta: list[dict[str, Any]], tokenizer: Any
) -> list[dict[str, Any]]:
    """Model eval outputs -> plain per-image records (picklable, device-free) for the gather.

    Boxes stay xyxy in original pixels (the model was given ``orig_sizes``); labels stay 1..K.
    """
    records = []
    for out, m in zip(outputs, meta, strict=True):
        rec: dict[str, Any] = {"image_id": int(m["image_id"])}
        if "boxes" in out:
            rec["boxes"] = out["boxes"].detach().float().cpu().tolist()
            rec["scores"] = out["scores"].detach().float().cpu().tolist()
            rec["labels"] = out["labels"].detach().cpu().tolist()
        if "caption_ids" in out:
            ids = out["caption_ids"].detach().cpu().tolist()
            rec["caption"] = tokenizer.decode(ids, skip_special_tokens=True).strip()
        records.append(rec)
    return records


def coco_detections(
    records: Iterable[dict[str, Any]], category_ids: Sequence[int | None], score_threshold: float
) -> list[dict]:
    """Records -> COCO results: original category ids (``category_ids[label - 1]``), xywh boxes.

    A label whose id is None (a class of the merged label space that this source does not annotate) is
    left out: the source cannot say whether such a box is right.
    """
    results = []
    for rec in records:
        for (x1, y1, x2, y2), score, label in zip(
            rec.get("boxes", []), rec.get("scores", []), rec.get("labels", []), strict=True
        ):
            if score < score_threshold or category_ids[label - 1] is None:
                continue
            results.append(
                {
                    "image_id": rec["image_id"],
                    "category_id": int(category_ids[label - 1]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    return results


def dedupe(
    records: Iterable[dict[str, Any]], expected_ids: Iterable[int], bad_samples: int = 0
) -> list[dict[str, Any]]:
    """One record per image, sorted by id; raise unless they are exactly the expected images.

    A loader may repeat samples to even out ranks, so duplicates are dropped. Samples skipped as bad
    (undecodable) are the only images allowed to be missing.

    Raises:
        EvalCountError: unknown images, or more images missing than ``bad_samples``.
    """
    expected = set(expected_ids)
    unique: dict[int, dict[str, Any]] = {}
    for rec in records:
        unique.setdefault(rec["image_id"], rec)
    unknown = sorted(set(unique) - expected)
    missing = sorted(expected - set(unique))
    if unknown or len(missing) != bad_samples:
        raise EvalCountError(
            f"predictions for {len(unique)} images, expected {len(expected)} with {bad_samples} bad samples: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(unknown)} not in the ground truth (e.g. {unknown[:5]})"
        )
    return [unique[i] for i in sorted(unique)]


# --------------------------------------------------------------------------------- distributed
class _Lockstep:
    """This rank's batches, then None until every rank has run out of batches: one all-reduce per step of
    [more batches, failed], so the ranks stop together as soon as any rank failed (:meth:`fail`).

    A rank whose step failed before its model forward must still run the forward the others run in that
    step (a stand-in) before the next all-reduce; the prediction loop does (:func:`_predict`).
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device) -> None:
        self.batches, self.device = batches, device
        self.error: Exception | None = None

    def fail(self, error: Exception) -> None:
        """Record this rank's failure: every rank stops at the next step."""
        if self.error is None:
            self.error = error

    def __iter__(self) -> Iterator[Batch | None]:
        it = iter(self.batches)
        exhausted = False
        while True:
            batch: Batch | None = None
            if not exhausted and self.error is None:
                try:
                    batch = next(it, None)
                except Exception as e:  # a broken loader: told to the others below, raised after the loop
                    self.fail(e)
                exhausted = batch is None
            flags = torch.tensor([0.0 if exhausted else 1.0, 0.0 if self.error is None else 1.0])
            flags = flags.to(self.device)
            more, failed = distributed.all_reduce_(flags, op="max").tolist()
            if failed or not more:
                return
            yield batch


@contextlib.contextmanager
def _synced_generation(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Captions generated in lockstep with the other ranks (see ``CaptionDecoder.synced_gpus``)."""
    captioner = getattr(model, "captioner", None)
    if not enabled or captioner is None:
        yield
        return
    captioner.synced_gpus = True
    try:
        yield
    finally:
        captioner.synced_gpus = False


def _on_rank0(work: Callable[[], Any], rank: int, *, share_result: bool) -> Any:
    """Run ``work()`` on rank 0 only; if it fails every rank raises (none is left waiting in a collective).

    Returns the result on rank 0, and on the other ranks too when ``share_result``, else None there.
    """
    result: Any = None
    error: Exception | None = None
    if rank == 0:
        try:
            result = work()
        except Exception as e:  # re-raised below, after the other ranks were told
            error = e
    status = distributed.broadcast_from_rank0(
        {
            "error": f"{type(error).__name__}: {error}" if error else None,
            "result": result if share_result else None,
        }
    )
    if error is not None:
        raise error
    if status["error"]:
        raise RuntimeError(f"evaluation failed on rank 0: {status['error']}")
    return result if rank == 0 else status["result"]


# ---------------------------------------------------------------------------------------- loop
def _predict(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    tokenizer: Any,
    device: torch.device,
    num_samples: int,
    synced: bool = False,
) -> tuple[list[dict[str, Any]], int, int, list[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]]]:
    """This rank's predictions, samples read, bad samples, and the first ``num_samples`` (image, meta, record).

    A batch of 0 images (a stream that owns no sample still hands over its counts) only adds its counts.
    With ``synced``, every rank runs the model once per step until all ranks are out of batches; a rank
    without images runs it on a dummy image and drops the result.
    """
    records: list[dict[str, Any]] = []
    samples: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]] = []
    read = bad = 0
    dummy = torch.zeros(1, 3, DUMMY_IMAGE_SIZE, DUMMY_IMAGE_SIZE, device=device)
    steps = _Lockstep(loader, device) if synced else None
    model.eval()
    with torch.no_grad(), _synced_generation(model, synced):
        for batch in steps if steps is not None else loader:
            forwarded = False  # this step's model forward was started (a collective with ZeRO-3)
            try:
                stats = batch.stats if batch is not None else {}
                read += int(stats.get("read", 0))
                bad += sum(int(n) for n in stats.get("bad", {}).values())
                meta = batch.meta if batch is not None else []
                if not meta:
                    if synced:
                        forwarded = True
                        model(dummy)
                    continue
                images = batch.images.to(device, non_blocking=True)
                image_sizes, orig_sizes = batch.image_sizes, [tuple(m["orig_size"]) for m in meta]
                forwarded = True
                outputs = model(images, image_sizes=image_sizes, orig_sizes=orig_sizes)
                new = to_records(outputs, meta, tokenizer)
                records += new
                for i in range(min(len(new), num_samples - len(samples))):
                    h, w = batch.image_sizes[i]
                    samples.append((batch.images[i, :, :h, :w].cpu(), meta[i], new[i]))
            except Exception as e:
                if steps is None:
                    raise
                # The other ranks stop at the next step; this one makes the forward they make in this one
                # (a failure inside the forward itself leaves its collectives unmatched: not recoverable).
                steps.fail(e)
                if not forwarded:
                    model(dummy)
    if steps is not None and steps.error is not None:
        raise steps.error
    return records, read, bad, samples


def render_sample(
    image: torch.Tensor,
    meta: dict[str, Any],
    record: dict[str, Any],
    category_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    min_score: float = SAMPLE_MIN_SCORE,
) -> tuple[Image.Image, str]:
    """A resized eval image (uint8 as the loader gives it, or normalised float) with its predictions drawn
    (boxes rescaled to the resized image)."""
    if image.dtype != torch.uint8:
        pixels = image.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        image = (pixels.clamp(0, 1) * 255).round().byte()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    keep = [i for i, s in enumerate(record.get("scores", [])) if s >= min_score]
    boxes = [[v * meta["scale"] for v in record["boxes"][i]] for i in keep]
    names = [category_names[record["labels"][i] - 1] for i in keep]
    caption = record.get("caption")
    drawn = draw_predictions(pil, boxes, names, [record["scores"][i] for i in keep], caption)
    return drawn, f"{record['image_id']}: {caption or ''}"


# ------------------------------------------------------------------------------------- metrics
def compute_metrics(
    records: list[dict[str, Any]],
    gt: GroundTruth,
    category_ids: Sequence[int | None],
    cfg: EvalConfig,
    *,
    bertscorer: Any = None,
) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """Metrics of deduplicated records, the COCO results list and the caption list.

    Partial labels: box metrics are taken over the images of ``gt.instances`` (those labelled for boxes),
    caption metrics over the images with reference captions; each count is in the metrics. A split without
    labels (a test set) is not scored: the results hold every image's predictions, for a test server.
    """
    metrics: dict[str, Any] = {"num_images": len(records)}
    if not gt.captions and (gt.instances is None or not gt.instances.getImgIds()):
        detections = coco_detections(records, category_ids, cfg.score_threshold)
        captions = [{"image_id": r["image_id"], "caption": r["caption"]} for r in records if "caption" in r]
        log.info("the split has no labels: results files written, not scored (%d images)", len(records))
        return metrics | {"num_detections": len(detections), "scoring": UNSCORED}, detections, captions
    detections: list[dict] = []
    if any("boxes" in r for r in records):
        if gt.instances is None:
            raise ValueError("the model predicts boxes but no instances ground truth was given")
        labelled = set(gt.instances.getImgIds())
        boxed = [r for r in records if r["image_id"] in labelled]
        metrics["num_box_images"] = len(boxed)
        if boxed:  # a captions-only split has no box metrics
            detections = coco_detections(boxed, category_ids, cfg.score_threshold)
            metrics.update(
                detection_metrics(
                    gt.instances, detections, image_ids=[r["image_id"] for r in boxed], classwise=True
                )
            )
            metrics["num_detections"] = len(detections)
    captions = [
        {"image_id": r["image_id"], "caption": r["caption"]}
        for r in records
        if "caption" in r and gt.captions.get(r["image_id"])
    ]
    if any("caption" in r for r in records):
        metrics["num_caption_images"] = len(captions)
    if captions:
        hyps = {c["image_id"]: c["caption"] for c in captions}
        refs = {i: gt.captions[i] for i in hyps}
        metrics.update(caption_metrics(refs, hyps, bertscore_model=None, scorer=bertscorer))
    return metrics, detections, captions


def write_outputs(
    out_dir: Path,
    metrics: dict[str, Any],
    detections: list[dict],
    captions: list[dict],
    per_class: list[dict[str, Any]] | None = None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    (out_dir / "detections.json").write_text(json.dumps(detections))
    (out_dir / "captions.json").write_text(json.dumps(captions, indent=1))
    if per_class:
        write_per_class_csv(out_dir / PER_CLASS_CSV, per_class)


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    *,
    gt: GroundTruth,
    category_ids: Sequence[int | None],
    category_names: Sequence[str],
    tokenizer: Any,
    cfg: EvalConfig,
    rank: int,
    world_size: int,
    out_dir: str | Path,
    device: torch.device,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    synced: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on this rank's share of the finite ``loader``; metrics on every rank.

    Call on every rank (collective after the loop). The caller sets autocast; gradients are off here.

    Args:
        model: A TICOD (or a DeepSpeed engine's ``.module``).
        loader: This rank's batches (the collate interface), each image of the split on exactly one rank.
        gt: Ground truth (read on rank 0 only); ``gt.image_ids`` are the images the ranks must cover.
        category_ids: Original COCO category id of each label 1..K (``category_ids[label - 1]``).
        category_names: Name of each label 1..K, for the sample images.
        tokenizer: Decodes generated caption ids.
        cfg: Score threshold, BERTScore settings, number of sample images.
        rank: This process's rank.
        world_size: Number of ranks.
        out_dir: Where rank 0 writes metrics.json, detections.json and captions.json.
        device: Device of the model.
        image_mean: Normalisation mean of float batches (to render their sample images).
        image_std: Normalisation std of the batches.
        synced: Run the model in lockstep on all ranks (needed when its weights are partitioned across
            ranks, ZeRO-3; slower otherwise, as every rank waits for the slowest at each step).

    Raises:
        EvalCountError: (RuntimeError on ranks other than 0) images of ``gt.image_ids`` missing beyond the
            bad samples, or images not in it.
    """
    t0 = time.perf_counter()
    captioning = getattr(model, "captioner", None) is not None

    def load_scorer() -> Any:
        # Before the loop: a BERTScore model that cannot load fails in seconds, not after the eval.
        if not (captioning and cfg.bertscore):
            return None
        return load_bertscorer(
            cfg.bertscore_model,
            cfg.bertscore_num_layers,
            cfg.bertscore_rescale_with_baseline,
            device=str(device),
        )

    scorer = _on_rank0(load_scorer, rank, share_result=False)

    num_samples = cfg.num_sample_images if rank == 0 else 0
    error = None
    try:
        records, read, bad, samples = _predict(
            model, loader, tokenizer, device, num_samples, synced and world_size > 1
        )
    except Exception as e:  # the other ranks learn of it through the gather below: none waits for this one
        log.exception("evaluation failed on rank %d while predicting", rank)
        records, read, bad, samples, error = [], 0, 0, [], f"{type(e).__name__}: {e}"
    t_loop = time.perf_counter() - t0
    gathered = distributed.gather_to_rank0((records, read, bad, error))
    per_class: list[dict[str, Any]] = []  # rank 0: AP and AP50 of every category

    def score() -> dict[str, Any]:
        assert gathered is not None
        failed = [f"rank {r}: {err}" for r, (*_, err) in enumerate(gathered) if err]
        if failed:
            raise RuntimeError(f"prediction failed on {'; '.join(failed)}")
        all_records = [r for recs, *_ in gathered for r in recs]
        total_bad = sum(b for _, _, b, _ in gathered)
        unique = dedupe(all_records, gt.image_ids, total_bad)
        metrics, detections, captions = compute_metrics(unique, gt, category_ids, cfg, bertscorer=scorer)
        per_class[:] = metrics.pop("per_class", [])  # to per_class.csv and a table, not metrics.json
        metrics.update(
            bad_samples=total_bad,
            samples_read=sum(n for _, n, _, _ in gathered),
            world_size=world_size,
            predict_time_s=t_loop,
            total_time_s=time.perf_counter() - t0,
        )
        write_outputs(Path(out_dir), metrics, detections, captions, per_class)
        if per_class:
            log.info("box AP per class in %s: %s", Path(out_dir) / PER_CLASS_CSV, describe_worst(per_class))
        return metrics

    metrics = _on_rank0(score, rank, share_result=True)
    sample_images = [
        render_sample(im, m, rec, category_names, image_mean, image_std) for im, m, rec in samples
    ]
    tables = {"per_class": per_class_table(per_class)} if per_class else {}
    if rank == 0 and samples:  # the page of sample predictions, and its wandb table
        drawn = [(im, rec) for (im, _), (_, _, rec) in zip(sample_images, samples, strict=True)]
        _, tables["samples"] = write_caption_page(out_dir, drawn, gt.captions)
    return EvalResult(metrics, sample_images, tables)


# ---------------------------------------------------------------------------------- evaluation
def run_evaluation(
    model: torch.nn.Module,
    cfg: Config,
    tokenizer: Any,
    categories: list[dict[str, Any]],
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    out_dir: str | Path,
    synced: bool = False,
    splits: Sequence[EvalSplit] | None = None,
) -> EvalResult:
    """Evaluate on ``cfg.data.val_split`` of ``cfg.data.shards_dir`` (training's in-loop eval and the CLI),
    or with ``data.sources`` on the val split of each source, apart.

    A mix's metrics are keyed ``<source>/<metric>`` and its files written to ``out_dir/<source>``; each
    source is scored in its own categories (``categories`` is the merged label space). ``splits``: the
    splits as :func:`ticod.data.spec.eval_splits` gives them (training works them out once); from ``cfg``
    and ``categories`` when None. Call on every rank. Caller sets eval mode / autocast as it wants; see
    :func:`evaluate` (``synced``).
    """
    splits = splits if splits is not None else eval_splits(cfg.data, categories)
    if len(splits) == 1 and not splits[0].name:
        return _evaluate_split(model, cfg, tokenizer, splits[0], rank, world_size, device, out_dir, synced)
    result = EvalResult({})
    for split in splits:
        part = _evaluate_split(
            model, cfg, tokenizer, split, rank, world_size, device, Path(out_dir) / split.name, synced
        )
        result.metrics.update({f"{split.name}/{k}": v for k, v in part.metrics.items()})
        result.sample_images += part.sample_images
        result.tables.update({f"{split.name}/{k}": v for k, v in part.tables.items()})
    if rank == 0:  # all sources in one file too (model card, tools/show_metrics.py)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(result.metrics, indent=2, allow_nan=True))
    return result


def _evaluate_split(
    model: torch.nn.Module,
    cfg: Config,
    tokenizer: Any,
    split: EvalSplit,
    rank: int,
    world_size: int,
    device: torch.device,
    out_dir: str | Path,
    synced: bool,
) -> EvalResult:
    from ticod.data.eval_stream import build_eval_loader

    ev = cfg.eval
    # Only rank 0 scores: the other ranks never read the ground truth.
    gt = (
        load_ground_truth(ev.instances_json, ev.captions_json, split.shards_dir, split.split)
        if rank == 0
        else GroundTruth(None, {}, [])
    )
    loader = build_eval_loader(
        cfg.data,
        tokenizer,
        rank=rank,
        world_size=world_size,
        split=split.split,
        max_samples=ev.max_images,
        shards_dir=split.shards_dir,
    )
    if ev.max_images:
        gt = subset(gt, loader.image_ids)
    return evaluate(
        model,
        loader,
        gt=gt,
        category_ids=split.category_ids,
        category_names=split.category_names,
        tokenizer=tokenizer,
        cfg=ev,
        rank=rank,
        world_size=world_size,
        out_dir=out_dir,
        device=device,
        image_mean=cfg.data.mean,
        image_std=cfg.data.std,
        synced=synced,
    )


# ------------------------------------------------------------------------------- inside training
class Evaluator:
    """Evaluation on the val split inside training (all ranks take part): :func:`run_evaluation` of a
    DeepSpeed engine's model."""

    def __init__(self, cfg: Config, tokenizer, categories: list[dict], *, rank: int, world_size: int, device):
        self.cfg, self.tokenizer, self.categories = cfg, tokenizer, categories
        self.rank, self.world_size, self.device = rank, world_size, device
        self._splits: list[EvalSplit] | None = None  # worked out at the first evaluation, then reused

    def run(self, engine, step: int, tracker: Tracker) -> dict[str, Any]:
        """Evaluate the engine's model at ``step`` (collective), log its finite metrics, images and tables."""
        out_dir = Path(self.cfg.run_dir) / "eval" / f"step_{step:08d}"
        if self._splits is None:
            self._splits = eval_splits(self.cfg.data, self.categories)
        engine.eval()
        with torch.no_grad(), engine_lib.autocast_context(engine):
            result = run_evaluation(
                engine.module,
                self.cfg,
                self.tokenizer,
                self.categories,
                rank=self.rank,
                world_size=self.world_size,
                device=self.device,
                out_dir=out_dir,
                # ZeRO-3 all-gathers weights at every module forward: ranks must run the model in lockstep.
                synced=engine.zero_optimization_stage() == 3,
                splits=self._splits,
            )
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        tracker.log(step, metrics, prefix="eval/")
        tracker.log_images(step, "eval/predictions", result.sample_images)
        tracker.log_tables(step, result.tables, prefix="eval/")
        return metrics


# ---------------------------------------------------------------------------------------- entry
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export dir, run dir or checkpoint dir")
    p.add_argument("--data", help="shards dir (default: the checkpoint config's data.shards_dir)")
    p.add_argument(
        "--split", help="split to evaluate (default: the config's data.val_split, or each data.sources' one)"
    )
    p.add_argument("--out", help="output dir (default: CHECKPOINT/eval/SPLIT)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.max_images=500")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ticod.tracker import Tracker, format_metrics, setup_console_logging

    args = parse_args(argv)
    from ticod.export import load_for_inference  # after --help: it loads the model stack

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.shards_dir={args.data}")
    if args.split:
        overrides.append(f"data.val_split={args.split}")
    if args.data or args.split:
        overrides.append("data.sources=[]")  # one split named here, not the training mix's
    info = distributed.world_info_from_env()
    setup_console_logging(info.rank)
    device = distributed.select_device(info)
    try:
        bundle = load_for_inference(args.checkpoint, device, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = bundle.cfg
    if info.world_size > 1:
        distributed.init_process_group(info, device, cfg.deepspeed.dist_timeout_s)
    try:
        out_dir = Path(args.out or Path(args.checkpoint) / "eval" / cfg.data.val_split)
        precision = cfg.deepspeed.precision
        # The precision the model trained in (its in-loop evals ran under the same autocast).
        autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and precision == Precision.bf16
        )
        with autocast:
            result = run_evaluation(
                bundle.model,
                cfg,
                bundle.tokenizer,
                bundle.categories,
                rank=info.rank,
                world_size=info.world_size,
                device=device,
                out_dir=out_dir,
            )
        numeric = {k: v for k, v in result.metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        tracker = Tracker(cfg.logging, out_dir, rank=info.rank, config=to_dict(cfg))
        tracker.log(0, numeric, prefix="eval/", echo=False)
        tracker.log_images(0, "eval/predictions", result.sample_images)
        tracker.log_tables(0, result.tables, prefix="eval/")
        tracker.summary({f"eval/{k}": v for k, v in numeric.items()})
        tracker.close()
        if info.rank == 0:
            unscored = {k: v for k, v in result.metrics.items() if v == UNSCORED}  # a test split
            print(format_metrics({**numeric, **unscored}))
            print(f"results in {out_dir}")
        return 0
    finally:
        distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())
