"""Print metrics.json files side by side: ``python tools/show_metrics.py NAME=PATH [NAME=PATH ...]``."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    columns = []
    for arg in argv:
        name, _, path = arg.partition("=")
        with open(path) as f:
            metrics = json.load(f)
        columns.append((name, metrics.get("metrics", metrics)))
    keys = [k for k, v in columns[0][1].items() if isinstance(v, int | float)]
    width = max(len(k) for k in keys)
    print(f"{'metric':<{width}}  " + "  ".join(f"{n:>10}" for n, _ in columns))
    for k in keys:
        print(f"{k:<{width}}  " + "  ".join(f"{float(m.get(k, float('nan'))):>10.4f}" for _, m in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
