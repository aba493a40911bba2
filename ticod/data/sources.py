"""The shard sets a run trains on (``data.sources``), their sampling weights and one merged label space.

A single ``data.shards_dir`` is a mix of one source. With several, every training stream draws shards from
all of them (:func:`shard_weights`), and the detection categories of the sources merge by name into the
labels 1..K the model predicts (:class:`LabelSpace`), renamed first where a ``data.category_map`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from ticod.config import DataConfig


class SourceError(ValueError):
    """A mix that cannot be built: unknown category names, a bad mapping file, a missing split."""


@dataclass(frozen=True)
class Source:
    name: str
    shards_dir: str
    weight: float
    train_split: str
    val_split: str


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """``data.sources``, or the one source ``shards_dir`` / ``train_split`` / ``val_split`` when it is empty."""
    if not cfg.sources:
        return [Source("", cfg.shards_dir, 1.0, cfg.train_split, cfg.val_split)]
    return [
        Source(s.name or Path(s.shards_dir).name, s.shards_dir, float(s.weight), s.train_split, s.val_split)
        for s in cfg.sources
    ]


def shard_weights(sizes: Sequence[Sequence[int]], weights: Sequence[float]) -> np.ndarray:
    """Draw probability of every shard (sources in order) such that source ``s`` gives a ``weights[s]``
    share of the samples drawn, and every sample of a source is drawn equally often.

    A stream reads a drawn shard whole, so each sample comes as often as its shard is drawn: within a
    source every (non-empty) shard is equally likely, and source ``s``'s shards share ``weights[s] / N_s``
    (``N_s`` its samples), which makes its samples per draw proportional to its weight.
    """
    parts = []
    for n, w in zip(sizes, weights, strict=True):
        n = np.asarray(n, dtype=np.float64)
        parts.append(np.where(n > 0, w / max(1.0, float(n.sum())), 0.0))
    p = np.concatenate(parts)
    return p / p.sum()


class LabelSpace:
    """The detection categories of all sources merged by name into labels 1..K.

    The merged list keeps the first source's categories with their ids, in id order; a name first seen in
    a later source is appended with a new id (above every id so far), so labels (which follow the sorted
    ids, :class:`ticod.data.coco.CategoryMap`) keep source order. A single source maps to itself.

    Args:
        sources: (source name, its manifest's categories) per source; captions-only sources have none.
        mapping: {source name: {its category name: merged name}}: renames applied before merging.

    Raises:
        SourceError: the mapping names a source or a category that does not exist.
    """

    def __init__(
        self, sources: Sequence[tuple[str, Sequence[dict[str, Any]]]], mapping: dict[str, dict[str, str]]
    ) -> None:
        unknown = sorted(set(mapping) - {name for name, _ in sources})
        if unknown:
            raise SourceError(
                f"data.category_map: no source named {unknown[0]!r} (sources: {[n for n, _ in sources]})"
            )
        self.categories: list[dict[str, Any]] = []
        by_name: dict[str, dict[str, Any]] = {}
        # source name -> {its category id: merged category id}
        self.to_merged: dict[str, dict[int, int]] = {}
        self.added: dict[str, list[str]] = {}  # source -> the names it brought into the label space
        for name, cats in sources:
            renames = mapping.get(name, {})
            missing = sorted(set(renames) - {str(c["name"]) for c in cats})
            if missing:
                raise SourceError(
                    f"data.category_map: source {name!r} has no category named {missing[0]!r} "
                    f"(its categories: {sorted(str(c['name']) for c in cats)[:20]}...)"
                )
            ids: dict[int, int] = {}
            primary = not self.categories  # the first source with categories keeps its ids
            for c in sorted(cats, key=lambda c: int(c["id"])):
                merged = str(renames.get(str(c["name"]), c["name"]))
                if merged not in by_name:
                    used = max((int(m["id"]) for m in self.categories), default=0)
                    by_name[merged] = {
                        "id": int(c["id"]) if primary else used + 1,
                        "name": merged,
                        "supercategory": str(c.get("supercategory", "")),
                    }
                    self.categories.append(by_name[merged])
                    self.added.setdefault(name, []).append(merged)
                ids[int(c["id"])] = int(by_name[merged]["id"])
            self.to_merged[name] = ids
        self.categories.sort(key=lambda c: int(c["id"]))

    def describe(self) -> str:
        """Which source brought how many (and which) categories: what a num_classes mismatch needs."""
        parts = []
        for name, names in self.added.items():
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            parts.append(f"{len(names)} from {name or 'the shards'}: {shown}")
        return "; ".join(parts) + (
            ". Names a source spells differently from another's become new categories: map them onto "
            "one name with data.category_map"
        )


def load_category_map(path: str) -> dict[str, dict[str, str]]:
    """``data.category_map``: a YAML/JSON mapping {source: {name: merged name}} ({} for "")."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise SourceError(f"data.category_map: file not found: {path}")
    data = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in v.items())
        for v in data.values()
    ):
        raise SourceError(f"{path}: must map each source name to {{its category name: merged name}}")
    return {str(k): dict(v) for k, v in data.items()}


def label_space(
    sources: Sequence[Source], manifests: Sequence[dict[str, Any]], category_map: str
) -> LabelSpace:
    """The merged label space of the sources, from their train manifests (read once by the caller). A single
    source without a name (``data.shards_dir``) takes the renames of a map with one entry."""
    cats = [(s.name, m["categories"]) for s, m in zip(sources, manifests, strict=True)]
    mapping = load_category_map(category_map)
    if len(sources) == 1 and not sources[0].name and len(mapping) == 1:
        # One unnamed source (data.shards_dir): its renames, under whatever name (e.g. onto the class names
        # of a model.init_from).
        mapping = {"": next(iter(mapping.values()))}
    return LabelSpace(cats, mapping)


def source_category_ids(
    merged: Sequence[dict[str, Any]], own: Sequence[dict[str, Any]], renames: dict[str, str]
) -> list[int | None]:
    """Per merged category in id order (labels 1..K): the id of the source category renamed onto it (the
    lowest where several were), None where the source has none: what scores the source in its own ids.

    Derived by name from the model's categories and the source's own (its val manifest's), so evaluating
    needs no train manifest.

    Raises:
        SourceError: a category of the source is not among the merged ones (a model of another mix).
    """
    names = {str(c["name"]) for c in merged}
    ids: dict[str, int] = {}
    for c in sorted(own, key=lambda c: int(c["id"])):
        name = str(renames.get(str(c["name"]), c["name"]))
        if name not in names:
            raise SourceError(f"category {name!r} of the source is not among the model's categories")
        ids.setdefault(name, int(c["id"]))
    return [ids.get(str(c["name"])) for c in sorted(merged, key=lambda c: int(c["id"]))]
