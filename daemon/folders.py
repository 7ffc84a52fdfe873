"""The on-disk layout every layer shares: where a job's outputs and grids go, the temporary
names writers use before the final rename, and where a job file is filed."""

from __future__ import annotations

import re
from pathlib import Path

TEMP_PREFIX = ".partial-"


def job_folder(outputs: Path, job_id: int, job_name: str) -> Path:
    """outputs/<job name>-<job id>: the id keeps two jobs of one name apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", job_name).strip("._") or "job"
    return outputs / f"{safe[:80]}-{job_id}"


def output_path(outputs: Path, job_id: int, job_name: str, index: int, seed: int,
                suffix: str = ".png") -> Path:
    return job_folder(outputs, job_id, job_name) / f"{index:05d}-{seed}{suffix}"


PAGE_PREFIX = "grid-page-"


def grid_files(folder: Path) -> list[Path]:
    """A job folder's grid and its pages, for links (status page, morning report)."""
    grid = folder / "grid.png"
    return ([grid] if grid.is_file() else []) + sorted(folder.glob(f"{PAGE_PREFIX}*.png"))


def unique_destination(folder: Path, file_name: str, job_id: int) -> Path:
    """folder/file_name, or folder/STEM.job<ID>SUFFIX when a file of that name is there."""
    target = folder / file_name
    if not target.exists():
        return target
    stem, suffix = Path(file_name).stem, Path(file_name).suffix
    return folder / f"{stem}.job{job_id}{suffix}"


def write_error_file(job_file: Path, report: str) -> None:
    job_file.with_name(job_file.name + ".error.txt").write_text(report, encoding="utf-8")
