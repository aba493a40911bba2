"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, PTB tokenizer) and BERTScore.

The pycocoevalcap scorers are the ones of the COCO caption evaluation server (SPICE left out: it needs
Stanford models downloaded at first use). PTB tokenisation and METEOR run Java.

BERTScore uses bert-score's own ``BERTScorer``. bert-score 0.3.13 predates transformers 5, which breaks
two things it relies on; :func:`_fix_bert_score_tokenizer` repairs them on the scorer's tokenizer only:

* RoBERTa/GPT-2 tokenizers: bert-score asks for ``add_prefix_space=True`` per ``encode`` call, which
  transformers 5 silently ignores; the tokenizer is reloaded with that setting instead, so "a dog"
  still becomes "Ġa Ġdog" as in bert-score's published numbers and baselines.
* ``build_inputs_with_special_tokens`` no longer exists; bert-score calls it (with no ids) to encode an
  empty candidate, which an untrained captioner produces.
"""

from __future__ import annotations

import contextlib
import io
from importlib.metadata import version
from typing import Any

import torch

COCO_CAPTION_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
BERTSCORE_KEYS = ("BERTScore-P", "BERTScore-R", "BERTScore-F1")


def _check_ids(refs: dict[Any, list[str]], hyps: dict[Any, str]) -> list[Any]:
    missing = [i for i in hyps if not refs.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no reference captions, e.g. {missing[:5]}")
    return sorted(hyps)


def coco_caption_scores(refs: dict[Any, list[str]], hyps: dict[Any, str]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of ``hyps`` (one per image) against all ``refs`` of the image."""
    # Imported here: training, predict and the GPU check run where pycocoevalcap (and Java) are absent.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = _check_ids(refs, hyps)
    if not ids:
        return dict.fromkeys(COCO_CAPTION_KEYS, float("nan"))
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": hyps[i]}] for i in ids})
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its statistics
        bleu, _ = Bleu(4).compute_score(gts, res)
    out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    meteor = Meteor()  # a Java process, killed when the object is deleted
    try:
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    finally:
        del meteor
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def _fix_bert_score_tokenizer(scorer: Any) -> None:
    """Make bert-score 0.3.13's tokenizer calls behave under transformers 5 as they did under 4."""
    from transformers import AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    tok = scorer._tokenizer
    if isinstance(tok, GPT2Tokenizer | RobertaTokenizer) and not getattr(tok, "add_prefix_space", True):
        tok = AutoTokenizer.from_pretrained(
            scorer.model_type, use_fast=scorer.use_fast_tokenizer, add_prefix_space=True
        )
    if not hasattr(tok, "build_inputs_with_special_tokens"):
        empty = tok.encode("", add_special_tokens=True)  # e.g. [CLS, SEP]
        tok.build_inputs_with_special_tokens = lambda ids: [*empty[:1], *ids, *empty[1:]]
    scorer._tokenizer = tok


def load_bertscorer(
    model: str, num_layers: int, rescale_with_baseline: bool, lang: str = "en", device: str | None = None
) -> Any:
    """bert-score's ``BERTScorer`` for a hub name or a local HF model dir.

    Args:
        model: HF hub name (e.g. roberta-large) or local dir (config ``eval.bertscore_model``).
        num_layers: Layer whose embeddings are compared; 0 = bert-score's tuned default for ``model``
            (known hub names only).
        rescale_with_baseline: Rescale with bert-score's baseline file for ``model`` and ``lang``.
        lang: Language of the captions.
        device: Torch device string; default CUDA when available.

    Raises:
        ValueError: the model, layer or baseline cannot be used; the message names the config key.
    """
    import bert_score
    from bert_score.utils import model2layers

    if not num_layers and model not in model2layers:
        raise ValueError(
            f"eval.bertscore_model={model!r} has no default layer in bert-score: set eval.bertscore_num_layers"
        )
    try:
        scorer = bert_score.BERTScorer(
            model_type=model,
            num_layers=num_layers or None,
            lang=lang,
            rescale_with_baseline=rescale_with_baseline,
            device=device,
        )
    except (OSError, ValueError, AssertionError) as e:
        raise ValueError(
            f"eval.bertscore_model={model!r} could not be loaded ({type(e).__name__}: {e}); set "
            "eval.bertscore_model to a local HF model dir (with eval.bertscore_num_layers), or eval.bertscore=false"
        ) from e
    if rescale_with_baseline:
        try:
            scorer.baseline_vals  # noqa: B018 - loads the baseline file now, not after the whole eval
        except ValueError as e:
            raise ValueError(
                f"eval.bertscore_rescale_with_baseline: bert-score has no {lang} baseline for {model!r}"
            ) from e
    _fix_bert_score_tokenizer(scorer)
    return scorer


def bertscore(
    refs: dict[Any, list[str]], hyps: dict[Any, str], scorer: Any, batch_size: int = 64
) -> dict[str, float]:
    """Mean BERTScore P/R/F1; each caption is scored against its best-matching reference, as bert-score does."""
    ids = _check_ids(refs, hyps)
    if not ids:
        return dict.fromkeys(BERTSCORE_KEYS, float("nan"))
    with torch.no_grad():
        p, r, f = scorer.score([hyps[i] for i in ids], [list(refs[i]) for i in ids], batch_size=batch_size)
    return {k: float(v.mean()) for k, v in zip(BERTSCORE_KEYS, (p, r, f), strict=True)}


def bertscore_info(scorer: Any) -> dict[str, Any]:
    """What makes BERTScore numbers comparable: model, layer, baseline rescaling, idf, versions."""
    return {
        "model": scorer.model_type,
        "num_layers": scorer.num_layers,
        "rescale_with_baseline": scorer.rescale_with_baseline,
        "idf": scorer.idf,
        "lang": scorer.lang,
        "hash": scorer.hash,
        "bert_score_version": version("bert-score"),
        "transformers_version": version("transformers"),
    }


def caption_metrics(
    refs: dict[Any, list[str]],
    hyps: dict[Any, str],
    *,
    bertscore_model: str | None,
    num_layers: int = 0,
    rescale_with_baseline: bool = False,
    lang: str = "en",
    device: str | None = None,
    scorer: Any = None,
) -> dict[str, Any]:
    """All caption metrics of ``hyps`` (image id -> caption) against ``refs`` (image id -> all references).

    Args:
        refs: Reference captions per image; every id of ``hyps`` needs at least one.
        hyps: One generated caption per evaluated image.
        bertscore_model: HF hub name or local model dir; None or "" skips BERTScore.
        num_layers: BERTScore layer; 0 = bert-score's default for the model.
        rescale_with_baseline: BERTScore baseline rescaling.
        lang: Caption language.
        device: Device for the BERTScore model.
        scorer: A :func:`load_bertscorer` result to use instead of loading ``bertscore_model`` (lets a
            caller check the BERTScore settings before a long evaluation).

    Returns:
        ``COCO_CAPTION_KEYS`` and ``BERTSCORE_KEYS`` -> float, "distinct_captions" -> how many different
        captions were generated (far below the number of images: the captioner ignores the image, which the
        n-gram metrics hide), and "bertscore" -> :func:`bertscore_info`.
    """
    out: dict[str, Any] = coco_caption_scores(refs, hyps)
    out["distinct_captions"] = len(set(hyps.values()))
    if scorer is None and bertscore_model:
        scorer = load_bertscorer(bertscore_model, num_layers, rescale_with_baseline, lang, device)
    if scorer is not None:
        out.update(bertscore(refs, hyps, scorer))
        out["bertscore"] = bertscore_info(scorer)
    return out
