"""The labelled grid a sweep job writes when it ends, like A1111's X/Y/Z plot: the first
sweep axis across, the other axes down (one row per combination of their values)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select

from daemon.outputs import TEMP_PREFIX, job_folder
from daemon.store import RENDER_DONE, Job, Render, Store

LABEL_HEIGHT = 24
MARGIN = 160  # room for the row labels


def write_sweep_grid(store: Store, outputs: Path, job_id: int) -> Path | None:
    """Write outputs/<job>/grid.png for a finished sweep job; None for other jobs."""
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is None or not job.spec_json:
            return None
        axes = list(json.loads(job.spec_json).get("sweep", {}).items())
        if not axes:
            return None
        renders = session.execute(select(Render.spec_json, Render.output_path, Render.state)
                                  .where(Render.job_id == job_id).order_by(Render.index)).all()
        job_name = job.name
    cells: dict[tuple[str, ...], Path] = {}
    for spec_json, output, state in renders:
        labels = json.loads(spec_json).get("extra", {}).get("sweep", {})
        key = tuple(_label(labels.get(axis)) for axis, _ in axes)
        if state == RENDER_DONE and output and key not in cells:
            path = Path(output)
            cells[key] = path.with_suffix(".png") if path.suffix == ".mp4" else path
    if not cells:
        return None
    columns = [_label(v) for v in axes[0][1]]
    rows = list(itertools.product(*[[_label(v) for v in values] for _, values in axes[1:]]))
    sample = next(iter(cells.values()))
    with Image.open(sample) as first:
        width, height = first.size
    grid = Image.new("RGB", (MARGIN + width * len(columns), LABEL_HEIGHT + height * len(rows)),
                     "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, column in enumerate(columns):
        draw.text((MARGIN + c * width + 4, 4), f"{axes[0][0]}: {column}", fill="black", font=font)
    for r, row in enumerate(rows):
        label = ", ".join(f"{axis}: {value}" for (axis, _), value in zip(axes[1:], row,
                                                                          strict=True))
        draw.text((4, LABEL_HEIGHT + r * height + 4), label or "", fill="black", font=font)
        for c, column in enumerate(columns):
            path = cells.get((column, *row))
            if path is None or not path.exists():
                continue  # a failed cell stays blank
            with Image.open(path) as image:
                grid.paste(image.convert("RGB").resize((width, height)),
                           (MARGIN + c * width, LABEL_HEIGHT + r * height))
    folder = job_folder(outputs, job_id, job_name)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "grid.png"
    temp = folder / f"{TEMP_PREFIX}grid.png"
    grid.save(temp)
    os.replace(temp, target)
    return target


def _label(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
