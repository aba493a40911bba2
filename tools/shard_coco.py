"""Turn a COCO split (JPEG dir + instances and/or captions JSON) into WebDataset shards + a manifest.

Run from a checkout; the same as ``ticod-shard-coco`` / ``python -m ticod.shard_coco`` (see ``--help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from ticod.shard_coco import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    raise SystemExit(main())
