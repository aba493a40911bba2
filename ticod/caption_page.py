"""A page of sample predictions in the eval dir: each image with its predicted boxes, the predicted caption and
the reference captions, so a run without wandb can be looked at too.

``EVAL_DIR/samples.md`` (Markdown: a table, readable in any viewer of the repository or the run dir) with the
images beside it in ``EVAL_DIR/samples/<image id>.jpg``; the same rows go to wandb as a table. The number of
images is ``eval.num_sample_images`` (the first images of rank 0's share of the split).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

PAGE = "samples.md"
IMAGES = "samples"
COLUMNS = ["image_id", "image", "predicted", "references"]


def _cell(text: str) -> str:
    """Text for a Markdown table cell: HTML-escaped, no pipes or line breaks."""
    return html.escape(text).replace("|", "&#124;").replace("\n", " ")


def write_caption_page(
    out_dir: str | Path,
    samples: Sequence[tuple[Image.Image, dict[str, Any]]],
    references: Mapping[int, Sequence[str]],
    title: str = "Sample predictions",
) -> tuple[Path, tuple[list[str], list[list[Any]]]]:
    """Write the page and its images for ``samples`` (drawn image, per-image record) and return it with
    the wandb table (columns, rows).

    Args:
        out_dir: The eval dir.
        samples: Images with their predicted boxes drawn (:func:`ticod.evaluate.render_sample`) and their
            records (``image_id``, ``caption`` where the model captions).
        references: Image id -> reference captions (none for a split without captions).
        title: The page's heading.
    """
    out = Path(out_dir)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| image | predicted caption | reference captions |", "|---|---|---|"]
    rows: list[list[Any]] = []
    for image, record in samples:
        iid = int(record["image_id"])
        name = f"{IMAGES}/{iid}.jpg"
        image.convert("RGB").save(out / name, quality=90)
        predicted = str(record.get("caption", ""))
        refs = [str(r) for r in references.get(iid, [])]
        shown = "<br>".join(f"{i + 1}. {_cell(r)}" for i, r in enumerate(refs)) or "(none)"
        lines.append(f"| ![{iid}]({name})<br>{iid} | {_cell(predicted)} | {shown} |")
        rows.append([iid, image, predicted, "\n".join(refs)])
    page = out / PAGE
    page.write_text("\n".join(lines) + "\n")
    return page, (list(COLUMNS), rows)
