"""The labelled grid a sweep job writes when it ends, like A1111's X/Y/Z plot: the first
sweep axis across, the other axes down (one row per combination of their values). With three
axes or more, each combination of the third and later axes also gets a page of its own
(grid-page-01.png, ...): the first axis across, the second down.

Labels are what each render recorded (RenderSpec.extra["sweep"]): a LoRA with its epoch, a
checkpoint, a prompt's first words, a setting's value.
"""

from __future__ import annotations

import itertools
import json
import os
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select

from daemon.folders import PAGE_PREFIX, TEMP_PREFIX, job_folder
from daemon.store.models import RENDER_DONE, Job, Render, Store

LABEL_HEIGHT = 24
MARGIN = 160  # room for the row labels
LINE_HEIGHT = 12  # the default bitmap font's line
CHARACTER_WIDTH = 6  # ... and its width per character, to wrap labels to a cell


def write_sweep_grid(store: Store, outputs: Path, job_id: int) -> Path | None:
    """Write outputs/<job>/grid.png (and its pages) for a finished sweep job; None for other
    jobs."""
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is None or not job.spec_json:
            return None
        renders = session.execute(select(Render.spec_json, Render.output_path, Render.state)
                                  .where(Render.job_id == job_id).order_by(Render.index)).all()
        job_name, job_spec = job.name, json.loads(job.spec_json)
    records = []
    for spec_json, output, state in renders:
        extra = json.loads(spec_json).get("extra", {})
        records.append((extra.get("sweep") or {}, extra.get("sweep_axes"), output, state))
    if not records or not records[0][0]:
        return None
    # The axes in the job's order (a render's JSON keeps its labels sorted by name).
    names = records[0][1] or list(job_spec.get("sweep", {})) or sorted(records[0][0])
    values: dict[str, list[str]] = {name: [] for name in names}
    cells: dict[tuple[str, ...], Path] = {}
    for labels, _, output, state in records:
        key = tuple(_label(labels.get(name)) for name in names)
        for name, label in zip(names, key, strict=True):
            if label not in values[name]:
                values[name].append(label)  # renders are in the sweep's order
        if state == RENDER_DONE and output and key not in cells:
            path = Path(output)
            cells[key] = path.with_suffix(".png") if path.suffix == ".mp4" else path
    if not cells:
        return None
    sample = next(iter(cells.values()))
    with Image.open(sample) as first:
        size = first.size
    folder = job_folder(outputs, job_id, job_name)
    folder.mkdir(parents=True, exist_ok=True)
    columns = [(v,) for v in values[names[0]]]
    rows = list(itertools.product(*[values[name] for name in names[1:]]))
    target = _save(_draw(names[0:1], columns, names[1:], rows, cells, size, None),
                   folder / "grid.png")
    for old in folder.glob(f"{PAGE_PREFIX}*.png"):
        old.unlink()
    if len(names) >= 3:
        pages = itertools.product(*[values[name] for name in names[2:]])
        for number, page in enumerate(pages, start=1):
            title = ", ".join(f"{name}: {value}" for name, value in
                              zip(names[2:], page, strict=True))
            page_cells = {key[:2]: path for key, path in cells.items() if key[2:] == page}
            page_rows = [(v,) for v in values[names[1]]]
            _save(_draw(names[0:1], columns, names[1:2], page_rows, page_cells, size, title),
                  folder / f"{PAGE_PREFIX}{number:02d}.png")
    return target


def _draw(column_axes: list[str], columns: list[tuple[str, ...]], row_axes: list[str],
          rows: list[tuple[str, ...]], cells: dict[tuple[str, ...], Path],
          size: tuple[int, int], title: str | None) -> Image.Image:
    width, height = size
    per_line = max(8, width // CHARACTER_WIDTH)
    headers = [textwrap.wrap(", ".join(f"{a}: {v}" for a, v in zip(column_axes, column,
                                                                    strict=True)), per_line)
               for column in columns]
    top = max(LABEL_HEIGHT, 8 + LINE_HEIGHT * max(len(lines) for lines in headers))
    if title:
        top += LINE_HEIGHT + 4
    grid = Image.new("RGB", (MARGIN + width * len(columns), top + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    header_top = top - 4 - LINE_HEIGHT * max(len(lines) for lines in headers)
    for c, lines in enumerate(headers):
        for n, line in enumerate(lines):
            draw.text((MARGIN + c * width + 4, header_top + n * LINE_HEIGHT), line,
                      fill="black", font=font)
    for r, row in enumerate(rows):
        label = "\n".join(textwrap.wrap(", ".join(f"{a}: {v}" for a, v in
                                                  zip(row_axes, row, strict=True)),
                                        MARGIN // CHARACTER_WIDTH - 1))
        draw.multiline_text((4, top + r * height + 4), label, fill="black", font=font)
        for c, column in enumerate(columns):
            path = cells.get((*column, *row))
            if path is None or not path.exists():
                continue  # a failed cell stays blank
            with Image.open(path) as image:
                grid.paste(image.convert("RGB").resize((width, height)),
                           (MARGIN + c * width, top + r * height))
    return grid


def _save(image: Image.Image, target: Path) -> Path:
    temp = target.with_name(f"{TEMP_PREFIX}{target.name}")
    image.save(temp)
    os.replace(temp, target)
    return target


def _label(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
