"""TICOD: joint image captioning and object detection (Swin + Cascade R-CNN + GPT-2) trained with DeepSpeed.

Importing the package first checks the installed torch / torchvision pair, from package metadata (cheap: torch
is not imported here). A cluster's own torch build is kept by ``pip install`` (the requirements are ranges), so
a torch older than the floor in ``pyproject.toml`` or a torchvision built for another torch is possible; either
fails here with one line instead of an obscure operator error deep in torchvision later.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import metadata

# torch 2.N ships with torchvision 0.(N + 15): 2.6 / 0.21, ..., 2.14 / 0.29.
TORCHVISION_MINOR_OFFSET = 15


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else None


def _torch_floor(requires: list[str]) -> tuple[str, tuple[int, int]] | None:
    """The ``torch>=X.Y`` floor among this package's requirements, as (text, (X, Y))."""
    for req in requires:
        m = re.fullmatch(r"torch\s*>=\s*([\d.]+)[^;]*", req.strip())
        if m and (floor := _major_minor(m[1])):
            return m[1], floor
    return None


def check_torch_pair(version: Callable[[str], str] = metadata.version) -> None:
    """Raise ImportError (one line) if torch is older than TICOD's floor or torchvision does not match it.

    Packages without metadata (a torch built from source) are not checked.
    """
    try:
        torch_v, vision_v = version("torch"), version("torchvision")
    except metadata.PackageNotFoundError:
        return
    torch_mm, vision_mm = _major_minor(torch_v), _major_minor(vision_v)
    if torch_mm is None or vision_mm is None:
        return
    try:
        floor = _torch_floor(metadata.requires("ticod") or [])
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        floor = None
    if floor and torch_mm < floor[1]:
        raise ImportError(f"torch {torch_v} is too old: TICOD needs torch>={floor[0]} (and its torchvision)")
    if torch_mm[0] == 2 and (vision_mm[0], vision_mm[1] - torch_mm[1]) != (0, TORCHVISION_MINOR_OFFSET):
        want = f"0.{torch_mm[1] + TORCHVISION_MINOR_OFFSET}"
        raise ImportError(
            f"torchvision {vision_v} does not match torch {torch_v} (it needs torchvision {want}.x): "
            "install the pair built together"
        )


check_torch_pair()
