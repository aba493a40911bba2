"""What a run's data is, worked out once: its sources, their manifests, the merged label space, the eval splits.

:func:`resolve_data` reads ``data.sources`` (or the one source ``data.shards_dir``) and each train manifest
once, and merges the categories (:class:`ticod.data.sources.LabelSpace`). Training builds the spec in its
setup and hands it to the train loader. :func:`eval_splits` says which val splits an evaluation scores and
in which category ids, from the model's categories and the val manifests alone (evaluating needs no train
manifest). :func:`data_manifests` is what a model card describes. Nothing else reads the source list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ticod.config import DataConfig
from ticod.data.shards import read_manifest
from ticod.data.sources import (
    LabelSpace,
    Source,
    SourceError,
    label_space,
    load_category_map,
    resolve_sources,
    source_category_ids,
)


@dataclass(frozen=True)
class DataSpec:
    """The training data: sources in order, each one's train manifest, and their merged label space."""

    sources: list[Source]
    manifests: list[dict[str, Any]]
    space: LabelSpace

    @property
    def categories(self) -> list[dict[str, Any]]:
        """The model's categories (labels 1..K in id order)."""
        return self.space.categories

    @property
    def total_samples(self) -> int:
        return sum(int(m["total_samples"]) for m in self.manifests)

    def layout(self) -> list[list[Any]]:
        """[name, shards dir, split, weight, samples] per source: what a checkpoint records of the data."""
        return [
            [s.name, s.shards_dir, s.train_split, s.weight, m["total_samples"]]
            for s, m in zip(self.sources, self.manifests, strict=True)
        ]

    def shards_dirs(self) -> str:
        return ", ".join(s.shards_dir for s in self.sources)


def resolve_data(cfg: DataConfig, *, split: str | None = None) -> DataSpec:
    """The sources of ``cfg``, their train manifests (read once) and label space; ``split`` replaces the train
    split of a single source (tests and benchmarks read other splits as training streams)."""
    sources = resolve_sources(cfg)
    if split is not None and len(sources) == 1:
        sources[0] = dataclasses.replace(sources[0], train_split=split)
    manifests = [read_manifest(s.shards_dir, s.train_split) for s in sources]
    return DataSpec(sources, manifests, label_space(sources, manifests, cfg.category_map))


@dataclass(frozen=True)
class EvalSplit:
    """One split an evaluation scores: where it is, and the id of each model label in its own categories."""

    name: str  # the source's name, "" for a run on one shards dir (metrics unprefixed)
    shards_dir: str
    split: str
    category_ids: list[int | None]  # per label 1..K: the split's category id, None where it has none
    category_names: list[str]


def eval_splits(cfg: DataConfig, categories: Sequence[dict[str, Any]]) -> list[EvalSplit]:
    """The val split of ``data.shards_dir``, or with ``data.sources`` each source's (those with one), scored
    in its own category ids (derived by name from the model's ``categories`` and the source's val manifest).

    Raises:
        ValueError: a source has a category the model does not know (a model of another mix).
    """
    merged = sorted(categories, key=lambda c: int(c["id"]))
    names = [str(c["name"]) for c in merged]
    if not cfg.sources:
        return [EvalSplit("", cfg.shards_dir, cfg.val_split, [int(c["id"]) for c in merged], names)]
    renames = load_category_map(cfg.category_map)
    splits = []
    for src in resolve_sources(cfg):
        if not src.val_split:
            continue
        own = read_manifest(src.shards_dir, src.val_split)["categories"]
        try:
            ids = source_category_ids(merged, own, renames.get(src.name, {}))
        except SourceError as e:
            raise ValueError(f"source {src.name!r}: {e}: the model was not trained on this mix") from None
        splits.append(EvalSplit(src.name, src.shards_dir, src.val_split, ids, names))
    return splits


def data_manifests(cfg: DataConfig) -> dict[str, dict[str, Any] | str]:
    """Manifest (or why it cannot be read) of every train and val split: ``<source>/<split>`` for a mix."""
    out: dict[str, dict[str, Any] | str] = {}
    for src in resolve_sources(cfg):
        for split in dict.fromkeys(s for s in (src.train_split, src.val_split) if s):
            key = f"{src.name}/{split}" if src.name else split
            try:
                out[key] = read_manifest(src.shards_dir, split)
            except (FileNotFoundError, ValueError) as e:
                out[key] = str(e)
    return out


def source_names(cfg: DataConfig) -> list[str]:
    """The sources' names, in order ("" for a run on one shards dir)."""
    return [s.name for s in resolve_sources(cfg)]
