"""Rank-0 side effects in one place: console lines, ``train_log.jsonl`` and wandb (imported lazily).

Other ranks get a tracker whose methods do nothing, so callers never branch on rank. The wandb
run id is kept in ``run_dir/wandb_id`` so a resumed run continues the same wandb run. The API key
is left to wandb's own login (``WANDB_API_KEY`` or ``~/.netrc``); it is never read, logged or
written by TICOD.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

from ticod.config import LoggingConfig, WandbMode

log = logging.getLogger("ticod")


def setup_console_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, int | str):
            parts.append(f"{k}={v}")
    return " ".join(parts)


class Tracker:
    """Metrics sink for one run (active on rank 0 only)."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, *, rank: int, config: dict[str, Any]) -> None:
        self.active = rank == 0
        self.run_dir = Path(run_dir)
        self._wandb = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "train_log.jsonl").open("a", buffering=1)
        if cfg.wandb.mode != WandbMode.disabled:
            self._wandb = self._start_wandb(cfg, config)

    def _start_wandb(self, cfg: LoggingConfig, config: dict[str, Any]):
        import wandb

        id_file = self.run_dir / "wandb_id"
        # Our own id (wandb >= 0.31 has no public generator): 12 lowercase hex chars, valid for wandb.
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id)
        run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            name=cfg.wandb.name or self.run_dir.name,
            tags=list(cfg.wandb.tags),
            mode=cfg.wandb.mode.value,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            config=config,
        )
        # Charts against our optimizer step, also after a resume.
        run.define_metric("*", step_metric="step")
        return run

    def log(self, step: int, metrics: dict[str, Any], *, prefix: str = "", echo: bool = True) -> None:
        if not self.active:
            return
        row = {f"{prefix}{k}": v for k, v in metrics.items()}
        clean = {k: v for k, v in row.items() if not (isinstance(v, float) and not math.isfinite(v))}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")
        if echo:
            log.info("step %d %s", step, format_metrics(row))
        if self._wandb is not None:
            self._wandb.log({"step": step, **clean})

    def log_images(self, step: int, key: str, images: list[tuple[Any, str]]) -> None:
        """Log PIL images with captions as wandb media (no-op without wandb)."""
        if not self.active or self._wandb is None or not images:
            return
        import wandb

        self._wandb.log({"step": step, key: [wandb.Image(im, caption=c) for im, c in images]})

    def log_tables(
        self, step: int, tables: dict[str, tuple[list[str], list[list[Any]]]], *, prefix: str = ""
    ) -> None:
        """Log ``{key: (columns, rows)}`` as wandb tables, PIL images in cells as wandb images (no-op
        without wandb)."""
        if not self.active or self._wandb is None or not tables:
            return
        import wandb
        from PIL import Image

        def cell(v: Any) -> Any:
            return wandb.Image(v) if isinstance(v, Image.Image) else v

        logged = {
            f"{prefix}{key}": wandb.Table(columns=columns, data=[[cell(v) for v in row] for row in rows])
            for key, (columns, rows) in tables.items()
        }
        self._wandb.log({"step": step, **logged})

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        if not self.active:
            return
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
