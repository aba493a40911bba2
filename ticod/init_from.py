"""Fine-tune from a trained TICOD: ``model.init_from=PATH`` loads its weights into a new run.

PATH is an export dir (``model.safetensors``), a run dir (its ``export/``, else its newest checkpoint) or a
checkpoint dir. Only the weights are taken: the optimizer and the LR schedule start fresh at step 0 (a run
that resumes, ``checkpoint.resume``, continues from its own checkpoint and ignores ``init_from``).

- Another label set: the class-specific layers (each cascade stage's ``cls_score``, and its ``bbox_pred``
  where boxes are class-specific) keep the background row and the rows of the classes both label sets
  have, matched by name (``data.category_map`` renames the new data's classes onto the model's names
  first); the other rows keep their fresh initialisation. The object tokens' projection of the class
  probabilities has a column per class instead, mapped alike. The log names the keys and the rows kept.
- Another tokenizer or vocabulary: refused. The caption decoder's embedding and LM head are the model's
  vocabulary; fine-tune with the source's tokenizer (``data.tokenizer=PATH/tokenizer`` of an export).
- Any other difference of shape or key (another backbone, FPN width, caption decoder size) fails at
  start, naming the key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ticod import checkpoint as ckpt_lib
from ticod.config import ConfigError

log = logging.getLogger("ticod")

WEIGHTS = "model.safetensors"  # as ticod.export writes it


@dataclass
class Source:
    """The weights, label set and tokenizer of the model to start from."""

    path: Path  # the export or checkpoint dir the weights came from
    state: dict[str, torch.Tensor]
    categories: list[dict[str, Any]]
    tokenizer: Any


@dataclass
class InitReport:
    """What :func:`init_weights` did, for the log."""

    source: Path
    copied: int = 0  # tensors copied whole
    class_keys: list[str] = field(default_factory=list)  # class-specific tensors, rows mapped
    kept: list[tuple[str, str]] = field(default_factory=list)  # (this run's class, the source's class)
    fresh: list[str] = field(default_factory=list)  # this run's classes with freshly initialised rows

    def describe(self) -> str:
        kept = ", ".join(f"{n}<-{s}" if n != s else n for n, s in self.kept) or "none"
        return (
            f"model.init_from={self.source}: {self.copied} tensors copied; class-specific "
            f"{', '.join(self.class_keys) or 'none'}: background and {len(self.kept)} class rows kept "
            f"({kept}), {len(self.fresh)} fresh ({', '.join(self.fresh) or 'none'})"
        )


def read_source(path: str | Path) -> Source:
    """The model at ``path``: an export dir, a run dir or a checkpoint dir."""
    from ticod.data.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / WEIGHTS).is_file() and (path / "export" / WEIGHTS).is_file():
        path = path / "export"
    if (path / WEIGHTS).is_file():
        files, state = path, load_file(str(path / WEIGHTS))
    else:
        ckpt = ckpt_lib.latest_checkpoint(path) if (path / ckpt_lib.CKPT_DIR).is_dir() else path
        if ckpt is None or not (ckpt / ckpt_lib.STATE_FILE).is_file():
            raise ConfigError(
                f"config key 'model.init_from': {path}: no export ({WEIGHTS}), run dir or complete checkpoint"
            )
        from ticod.engine import consolidated_state_dict

        path, files, state = ckpt, ckpt.parent.parent, consolidated_state_dict(ckpt)  # run/checkpoints/X
    categories = json.loads((files / "categories.json").read_text())
    return Source(path, state, categories, load_tokenizer(str(files / "tokenizer")))


def _norm(name: Any) -> str:
    return str(name).strip().lower()


def class_rows(
    categories: Sequence[dict[str, Any]], source_categories: Sequence[dict[str, Any]]
) -> tuple[dict[int, int], list[str]]:
    """{this run's label: the source's label} of the classes both have (by name; labels follow sorted ids,
    0 is background and always kept) and the names of this run's classes the source lacks."""
    src = {
        _norm(c["name"]): i + 1 for i, c in enumerate(sorted(source_categories, key=lambda c: int(c["id"])))
    }
    rows, fresh = {0: 0}, []
    for j, c in enumerate(sorted(categories, key=lambda c: int(c["id"]))):
        if _norm(c["name"]) in src:
            rows[j + 1] = src[_norm(c["name"])]
        else:
            fresh.append(str(c["name"]))
    return rows, fresh


def _same_tokenizer(a: Any, b: Any) -> bool:
    specials = ("bos_token_id", "eos_token_id", "pad_token_id")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, s) == getattr(b, s) for s in specials)


def init_weights(
    model: torch.nn.Module, source: Source, categories: Sequence[dict[str, Any]], tokenizer: Any
) -> InitReport:
    """Load ``source``'s weights into the freshly initialised ``model`` (in place), mapping class rows.

    Raises:
        ConfigError: another tokenizer, or a key or shape that differs other than by the label set.
    """
    if not _same_tokenizer(source.tokenizer, tokenizer):
        raise ConfigError(
            f"config key 'model.init_from': {source.path} was trained with another tokenizer (vocabulary of "
            f"{len(source.tokenizer)} tokens, this run's data.tokenizer has {len(tokenizer)} or other ids): "
            "the caption decoder's embedding and LM head are that vocabulary, so a fine-tune keeps it; set "
            f"data.tokenizer to the source's tokenizer dir ({source.path}/tokenizer for an export)"
        )
    rows, fresh = class_rows(categories, source.categories)
    src_names = [str(c["name"]) for c in sorted(source.categories, key=lambda c: int(c["id"]))]
    names = [str(c["name"]) for c in sorted(categories, key=lambda c: int(c["id"]))]
    report = InitReport(source.path, fresh=fresh)
    report.kept = [(names[j - 1], src_names[i - 1]) for j, i in rows.items() if j]
    target = model.state_dict()
    state = dict(source.state)
    tied: dict[int, list[str]] = {}  # GPT-2's LM head is its token embedding: an export stores one name
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for aliases in tied.values():
        stored = [n for n in aliases if n in state]
        for name in aliases if stored else ():
            state.setdefault(name, state[stored[0]])
    unexpected = sorted(set(state) - set(target))
    missing = sorted(set(target) - set(state))
    if unexpected or missing:
        key = (unexpected or missing)[0]
        where = "only in the source model" if unexpected else "missing from the source model"
        raise ConfigError(
            f"config key 'model.init_from': {source.path}: parameter {key} is {where} "
            f"({len(unexpected)} unexpected, {len(missing)} missing): another architecture"
        )
    new: dict[str, torch.Tensor] = {}
    k_src, k_new = len(src_names) + 1, len(names) + 1
    columns = _class_column_keys(model)
    for key, value in state.items():
        mine = target[key]
        if key in columns:  # one column per class: map them as the rows below, transposed
            if value.shape != (mine.shape[0], k_src):
                raise ConfigError(
                    f"config key 'model.init_from': {source.path}: parameter {key} has shape "
                    f"{tuple(value.shape)} in the source model: not {mine.shape[0]} x one column per class"
                )
            new[key] = _class_blocks(value.T, mine.T, rows, 1).T.contiguous()
            report.class_keys.append(key)
            continue
        layer = key.split(".")[-2] if "." in key else ""
        # cls_score: one row per class; bbox_pred: four where class-specific (class-agnostic: 4 rows in all).
        per_class = "roi_heads." in key and (
            (layer == "cls_score" and value.shape[0] == k_src)
            or (layer == "bbox_pred" and value.shape[0] == 4 * k_src)
        )
        if not per_class:
            if value.shape != mine.shape:
                raise ConfigError(
                    f"config key 'model.init_from': {source.path}: parameter {key} has shape "
                    f"{tuple(value.shape)} in the source model and {tuple(mine.shape)} in this one; only the "
                    "class-specific layers may differ (model.num_classes)"
                )
            new[key] = value
            report.copied += 1
            continue
        width = value.shape[0] // k_src  # 1 row per class (scores) or 4 (class-specific boxes)
        if mine.shape[0] != width * k_new or mine.shape[1:] != value.shape[1:]:
            raise ConfigError(
                f"config key 'model.init_from': {source.path}: parameter {key} has shape {tuple(value.shape)} "
                f"in the source model and {tuple(mine.shape)} in this one: not one row block per class"
            )
        new[key] = _class_blocks(value, mine, rows, width)
        report.class_keys.append(key)
    model.load_state_dict(new)
    return report


def _class_blocks(value: torch.Tensor, mine: torch.Tensor, rows: dict[int, int], width: int) -> torch.Tensor:
    """A copy of ``mine`` whose block of ``width`` rows for each kept class j is ``value``'s block for its
    source class i (``rows``: j -> i); the other classes' rows stay as initialised."""
    out = mine.detach().clone()
    for j, i in rows.items():
        out[j * width : (j + 1) * width] = value[i * width : (i + 1) * width]
    return out


def _class_column_keys(model: torch.nn.Module) -> set[str]:
    """Names of the weights with one column per class (label 0 = background): the object tokens' projection
    of the detector's class probabilities (``TICOD.object_class_weight``), where the model has one."""
    weight = getattr(model, "object_class_weight", None)
    return {
        n for n, p in model.named_parameters(remove_duplicate=False) if weight is not None and p is weight
    }


def init_from(
    model: torch.nn.Module, path: str | Path, categories: Sequence[dict[str, Any]], tokenizer: Any
) -> InitReport:
    """:func:`read_source` then :func:`init_weights`, logged."""
    report = init_weights(model, read_source(path), categories, tokenizer)
    log.info("%s", report.describe())
    return report
