"""The read side: every query that shows the history, for the CLI (`history`, `stats`), the
status page and its JSON API, /metrics, webhook payloads, the live console and the morning
report. Nothing here writes.

Nearly everything here takes an open session and returns plain JSON-ready data (dicts, lists,
numbers, ISO times), so the page, its JSON API, the metrics and the report all show the same
numbers computed the same way.

Rates and the ETA: a render's cost is roughly proportional to its steps, and renders that
share a pipeline call finish together, so the measured unit is seconds per render-step: one
pipeline call's duration divided by the steps of all the renders in it. A call is a row of
the batches table when the worker records one (the renders point to it by batch_id);
otherwise the renders claimed together (same checkpoint, same claim time) stand in for it.
The median over recent calls is used, so one slow call (a pipeline load) does not swing it.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from daemon.folders import grid_files, job_folder
from daemon.store.models import (
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    PAUSED_KEY,
    RENDER_CANCELLED,
    RENDER_DONE,
    RENDER_FAILED,
    RENDER_QUEUED,
    RENDER_RUNNING,
    Batch,
    Event,
    Job,
    Lora,
    Render,
    RenderScore,
    Setting,
    Store,
    utcnow,
)

RECENT_CALLS = 50  # pipeline calls per checkpoint that the rate is measured over
QUEUE_ROWS = 200  # queued renders listed (the totals count all of them)


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def is_paused_in(session: Session) -> bool:
    """True while the daemon must not claim new renders (running ones still finish)."""
    setting = session.get(Setting, PAUSED_KEY)
    return setting is not None and setting.value == "1"


# -- output files --------------------------------------------------------------------------

def output_relpath(outputs: Path, output: str | None) -> str | None:
    """The output's path relative to the outputs folder ("job-3/00000-7.png"), or None when it
    lies elsewhere (the page serves nothing outside outputs/)."""
    if not output:
        return None
    try:
        return Path(output).resolve().relative_to(outputs.resolve()).as_posix()
    except ValueError:
        return None


def grid_relpaths(outputs: Path, job_id: int, job_name: str) -> list[str]:
    """A sweep job's grid and its pages, relative to the outputs folder (none for others)."""

    found = (output_relpath(outputs, str(path))
             for path in grid_files(job_folder(outputs, job_id, job_name)))
    return [rel for rel in found if rel]


def poster_relpath(relpath: str | None) -> str | None:
    """What to show as a thumbnail: the image itself, or a video's poster (same name, .png),
    which the worker writes before the video."""
    if relpath is None:
        return None
    path = Path(relpath)
    return path.with_suffix(".png").as_posix() if path.suffix.lower() != ".png" else relpath


# -- rates and the ETA ---------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """Measured seconds per render-step, per checkpoint and overall (None: not measured)."""

    by_checkpoint: dict[str, float] = field(default_factory=dict)
    overall: float | None = None

    def for_checkpoint(self, checkpoint: str) -> float | None:
        return self.by_checkpoint.get(checkpoint, self.overall)


@dataclass
class _Call:
    checkpoint: str
    start: dt.datetime
    end: dt.datetime
    steps: int = 0
    renders: int = 0
    wall: float | None = None  # from the batches table when there is a row

    @property
    def seconds(self) -> float:
        return self.wall if self.wall is not None else (self.end - self.start).total_seconds()


def _steps_of(spec_json: str) -> int:
    try:
        return max(1, int(json.loads(spec_json).get("steps") or 1))
    except (ValueError, TypeError, AttributeError):
        return 1


def _calls(session: Session, since: dt.datetime | None = None,
           limit: int = 2000) -> list[_Call]:
    """Recent pipeline calls reconstructed from the renders that ended done or failed."""
    query = (select(Render.checkpoint, Render.batch_id, Render.started_at, Render.finished_at,
                    Render.spec_json)
             .where(Render.state.in_((RENDER_DONE, RENDER_FAILED)),
                    Render.started_at.is_not(None), Render.finished_at.is_not(None))
             .order_by(Render.finished_at.desc()).limit(limit))
    if since is not None:
        query = query.where(Render.finished_at >= since)
    calls: dict[tuple[Any, ...], _Call] = {}
    for checkpoint, batch_id, started, finished, spec_json in session.execute(query):
        key: tuple[Any, ...] = (("batch", batch_id) if batch_id is not None
                                else ("claim", checkpoint, started))
        call = calls.get(key)
        if call is None:
            call = calls[key] = _Call(checkpoint, started, finished)
        call.start, call.end = min(call.start, started), max(call.end, finished)
        call.steps += _steps_of(spec_json)
        call.renders += 1
    batch_ids = [key[1] for key in calls if key[0] == "batch"]
    if batch_ids:
        for batch in session.scalars(select(Batch).where(Batch.id.in_(batch_ids))):
            if batch.wall_seconds > 0:
                calls[("batch", batch.id)].wall = batch.wall_seconds
    return list(calls.values())


def measured_rates(session: Session) -> Rates:
    per_checkpoint: dict[str, list[float]] = {}
    for call in sorted(_calls(session), key=lambda c: c.end, reverse=True):
        rates = per_checkpoint.setdefault(call.checkpoint, [])
        if len(rates) < RECENT_CALLS and call.steps and call.seconds > 0:
            rates.append(call.seconds / call.steps)
    by_checkpoint = {name: statistics.median(values)
                     for name, values in per_checkpoint.items() if values}
    everything = [v for values in per_checkpoint.values() for v in values]
    return Rates(by_checkpoint, statistics.median(everything) if everything else None)


# -- the queue -----------------------------------------------------------------------------

def state_counts(session: Session) -> tuple[dict[str, int], dict[str, int]]:
    renders = {s: n for s, n in session.execute(
        select(Render.state, func.count()).group_by(Render.state))}
    jobs = {s: n for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}
    return renders, jobs


def queue_snapshot(session: Session, outputs: Path, *, limit: int = QUEUE_ROWS,
                   recent: int = 12) -> dict[str, Any]:
    """The live part of the page: counts, running renders with progress, the queue with an
    ETA per render, and the newest outputs."""
    now = utcnow()
    renders, jobs = state_counts(session)
    rates = measured_rates(session)
    # Columns, not ORM objects, and each batch key's steps parsed once: a long queue is
    # read every 2 s by every open page.
    rows = session.execute(
        select(Render.id, Render.job_id, Render.index, Render.seed, Render.checkpoint,
               Render.state, Render.attempts, Render.worker, Render.progress_step,
               Render.progress_total, Render.started_at, Render.batch_key, Render.spec_json,
               Job.name, Job.file_name)
        .join(Job, Job.id == Render.job_id)
        .where(Render.state.in_((RENDER_RUNNING, RENDER_QUEUED)))
        .order_by((Render.state == RENDER_RUNNING).desc(), Render.priority.desc(), Render.id)
    ).all()
    steps_by_key: dict[str, int] = {}
    running: list[dict[str, Any]] = []
    queued: list[dict[str, Any]] = []
    workers: set[str | None] = set()
    running_left = 0.0
    queued_left = 0.0
    unknown = False
    for row in rows:
        if row.batch_key not in steps_by_key:
            steps_by_key[row.batch_key] = _steps_of(row.spec_json)
        steps = row.progress_total or steps_by_key[row.batch_key]
        rate = rates.for_checkpoint(row.checkpoint)
        item: dict[str, Any] = {
            "id": row.id, "job_id": row.job_id, "job": row.name, "file": row.file_name,
            "index": row.index, "seed": row.seed, "checkpoint": row.checkpoint,
            "state": row.state, "attempts": row.attempts, "steps": steps,
            "worker": row.worker,
        }
        if row.state == RENDER_RUNNING:
            step = min(row.progress_step or 0, steps)
            item["progress_step"], item["progress_total"] = step, steps
            item["progress"] = round(step / steps, 3) if steps else 0.0
            item["started_at"] = iso(row.started_at)
            item["elapsed_seconds"] = (round((now - row.started_at).total_seconds(), 1)
                                       if row.started_at else None)
            left = (steps - step) * rate if rate is not None else None
            # Renders of one call progress together, and workers run side by side: each
            # running render's ETA is its own remainder, and the longest one counts.
            item["eta_seconds"] = round(left, 1) if left is not None else None
            running_left = max(running_left, left or 0.0)
            unknown |= left is None
            workers.add(row.worker)
            running.append(item)
        else:
            left = steps * rate if rate is not None else None
            unknown |= left is None
            # The queue drains through every busy worker at once.
            queued_left += (left or 0.0) / max(1, len(workers))
            if len(queued) < limit:
                item["eta_seconds"] = (None if unknown else
                                       round(running_left + queued_left, 1))
                queued.append(item)
    total_left = 0.0 if not rows else None if unknown else round(running_left + queued_left, 1)
    hour_ago = now - dt.timedelta(hours=1)
    done_last_hour = session.scalar(select(func.count()).select_from(Render).where(
        Render.state == RENDER_DONE, Render.finished_at >= hour_ago)) or 0
    return {
        "at": iso(now),
        "paused": is_paused_in(session),
        "renders": renders,
        "jobs": jobs,
        "done": renders.get(RENDER_DONE, 0),
        "failed": renders.get(RENDER_FAILED, 0),
        "queued": renders.get(RENDER_QUEUED, 0),
        "running_count": renders.get(RENDER_RUNNING, 0),
        "done_last_hour": done_last_hour,
        "seconds_per_step": rates.overall,
        "eta_seconds": total_left,
        "running_renders": running,
        "queued_renders": queued,
        "recent": gallery(session, outputs, limit=recent),
    }


# -- history and the gallery ---------------------------------------------------------------

def _thumb(render: Render, outputs: Path) -> dict[str, Any] | None:
    rel = output_relpath(outputs, render.output_path)
    if rel is None:
        return None
    spec = json.loads(render.spec_json)
    return {"render_id": render.id, "job_id": render.job_id, "index": render.index,
            "seed": render.seed, "file": rel, "poster": poster_relpath(rel),
            "video": Path(rel).suffix.lower() != ".png",
            "prompt": spec.get("user_prompt") or spec.get("prompt", ""),
            "checkpoint": render.checkpoint, "finished_at": iso(render.finished_at)}


def gallery(session: Session, outputs: Path, *, limit: int = 60,
            since: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Newest done renders with an output, as thumbnails."""
    query = (select(Render).where(Render.state == RENDER_DONE, Render.output_path.is_not(None))
             .order_by(Render.finished_at.desc(), Render.id.desc()).limit(limit))
    if since is not None:
        query = query.where(Render.finished_at >= since)
    items = []
    for render in session.scalars(query):
        thumb = _thumb(render, outputs)
        if thumb is not None:
            items.append(thumb)
    return items


def history(session: Session, outputs: Path, *, limit: int = 50,
            thumbs_per_job: int = 8) -> list[dict[str, Any]]:
    jobs = []
    for job in session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)):
        states: dict[str, int] = {}
        for render in job.renders:
            states[render.state] = states.get(render.state, 0) + 1
        thumbs = [t for t in (_thumb(r, outputs) for r in job.renders
                              if r.state == RENDER_DONE) if t][:thumbs_per_job]
        spec = json.loads(job.spec_json) if job.spec_json else {}
        # A failed job's reasons are on its renders; the first few say enough for a list.
        failures = [f"render {r.index}: {r.error}" for r in job.renders
                    if r.state == RENDER_FAILED and r.error][:3]
        jobs.append({"id": job.id, "name": job.name, "file": job.file_name, "state": job.state,
                     "error": job.error, "failures": failures,
                     "checkpoint": spec.get("checkpoint"),
                     "prompt": spec.get("prompt"), "renders": states,
                     "created_at": iso(job.created_at), "finished_at": iso(job.finished_at),
                     "thumbs": thumbs, "grids": grid_relpaths(outputs, job.id, job.name)})
    return jobs


# -- one job -------------------------------------------------------------------------------

def _score_rows(session: Session, render_ids: list[int]) -> dict[int, list[RenderScore]]:
    """Each render's [[postprocess]] rows (scores, tags, gate verdicts), most confident
    first: the one read both the page and `lorafarm history` group from."""
    rows: dict[int, list[RenderScore]] = {}
    if render_ids:
        for row in session.scalars(select(RenderScore).where(
                RenderScore.render_id.in_(render_ids)).order_by(RenderScore.value.desc(),
                                                                 RenderScore.id)):
            rows.setdefault(row.render_id, []).append(row)
    return rows


def _post_processing(session: Session, render_ids: list[int]) -> dict[int, dict[str, Any]]:
    """What [[postprocess]] said about each render: scores by label, tags (most confident
    first) and the quality gate's verdict ("flagged", "reseeded", or a render id for a
    reseed's replacement)."""
    judged: dict[int, dict[str, Any]] = {}
    for render_id, rows in _score_rows(session, render_ids).items():
        entry = judged.setdefault(render_id, {"scores": {}, "tags": [], "gate": None})
        for row in rows:
            if row.kind == "score":
                entry["scores"][row.name] = round(row.value, 4)
            elif row.kind == "tag":
                entry["tags"].append(row.name)
            elif row.kind == "gate":
                entry["gate"] = (f"reseed of render {int(row.value)}"
                                 if row.name == "reseed_of" else row.name)
    return judged


def job_detail(session: Session, outputs: Path, job_id: int) -> dict[str, Any] | None:
    """Everything about one job: its parameters, each render's spec, LoRAs with hashes and
    patched-module counts, warnings, errors, outputs and its events."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    renders = []
    loras: dict[str, dict[str, Any]] = {}
    judged = _post_processing(session, [render.id for render in job.renders])
    for render in job.renders:
        spec = json.loads(render.spec_json)
        report = json.loads(render.lora_report_json) if render.lora_report_json else {}
        for use in spec.get("loras", []):
            entry = loras.setdefault(use["name"], {**use, "patched": None,
                                                   "modules_in_file": None})
            patched = dict(report.get(use["name"]) or {})
            if patched and entry["patched"] is None:
                entry["modules_in_file"] = patched.pop("modules_in_file", None)
                entry["patched"] = patched
        rel = output_relpath(outputs, render.output_path)
        seconds = ((render.finished_at - render.started_at).total_seconds()
                   if render.started_at and render.finished_at else None)
        renders.append({
            "id": render.id, "index": render.index, "seed": render.seed, "state": render.state,
            "attempts": render.attempts, "error": render.error, "output": render.output_path,
            "file": rel, "poster": poster_relpath(rel),
            "video": rel is not None and Path(rel).suffix.lower() != ".png",
            "frames": render.frames, "fps": render.fps,
            "progress_step": render.progress_step, "progress_total": render.progress_total,
            "started_at": iso(render.started_at), "finished_at": iso(render.finished_at),
            "seconds": round(seconds, 2) if seconds is not None else None,
            "spec": spec, "lora_patches": report or None,
            **judged.get(render.id, {"scores": {}, "tags": [], "gate": None}),
        })
    names = list(loras)
    if names:
        for row in session.scalars(select(Lora).where(Lora.name.in_(names))):
            entry = loras[row.name]
            if entry.get("autov2") in (None, row.autov2):
                entry.update(family=row.family, lineage=row.lineage, library_state=row.state)
    events = [{"at": iso(e.at), "kind": e.kind, "render_id": e.render_id, "message": e.message,
               "data": json.loads(e.data_json or "{}")}
              for e in session.scalars(select(Event).where(Event.job_id == job.id)
                                       .order_by(Event.id).limit(500))]
    return {
        "id": job.id, "name": job.name, "file": job.file_name, "file_path": job.file_path,
        "state": job.state, "priority": job.priority, "error": job.error,
        "grids": grid_relpaths(outputs, job.id, job.name), "warnings": job.warnings,
        "created_at": iso(job.created_at),
        "finished_at": iso(job.finished_at),
        "job": json.loads(job.spec_json) if job.spec_json else None,
        "renders": renders, "loras": list(loras.values()), "events": events,
        "can_cancel": job.state in (JOB_QUEUED, JOB_RUNNING),
        "can_retry": job.state == JOB_FAILED and any(
            r["state"] in (RENDER_FAILED, "cancelled") for r in renders),
    }


# -- the LoRA library ----------------------------------------------------------------------

def lora_rows(session: Session) -> list[dict[str, Any]]:
    return [{"id": row.id, "name": row.name, "path": row.path, "family": row.family,
             "architecture": row.architecture, "lineage": row.lineage,
             "lineage_source": row.lineage_source, "variant": row.variant,
             "expert": row.expert, "layout": row.layout, "rank": row.rank, "alpha": row.alpha,
             "triggers": row.triggers, "base_model": row.base_model, "autov2": row.autov2,
             "autov3": row.autov3, "sha256": row.sha256, "state": row.state,
             "reason": row.reason, "updated_at": iso(row.updated_at)}
            for row in session.scalars(select(Lora).order_by(Lora.name, Lora.path))]


# -- figures for the report and the metrics ------------------------------------------------

def busy_seconds(session: Session, since: dt.datetime) -> float:
    """Seconds spent in pipeline calls since `since`: the batches table's wall time when it
    has rows for the period, else the calls reconstructed from the renders."""
    from_batches = session.scalar(select(func.sum(Batch.wall_seconds))
                                  .where(Batch.started_at >= since))
    if from_batches:
        return float(from_batches)
    return sum(call.seconds for call in _calls(session, since=since, limit=100_000))


def pipeline_loads(session: Session) -> int:
    return int(session.scalar(select(func.sum(Batch.pipeline_loads))) or 0)


# -- `lorafarm history` ----------------------------------------------------------------------

def history_records(session: Session, limit: int = 50, *, tags: tuple[str, ...] = (),
                    min_score: tuple[str | None, float] | None = None) -> list[dict[str, Any]]:
    """The newest `limit` jobs with their renders (`lorafarm history --json`); with `tags` /
    `min_score`, only renders whose post-processing results match (and only jobs that have
    such a render)."""
    matching = None
    keep: set[int] = set()
    if tags or min_score is not None:
        matching = select(Render.id)
        for tag in tags:
            matching = matching.where(Render.id.in_(select(RenderScore.render_id).where(
                RenderScore.kind == "tag", RenderScore.name == tag)))
        if min_score is not None:
            name, least = min_score
            scored = select(RenderScore.render_id).where(RenderScore.kind == "score",
                                                         RenderScore.value >= least)
            if name is not None:
                scored = scored.where(RenderScore.name == name)
            matching = matching.where(Render.id.in_(scored))
    jobs = select(Job).order_by(Job.id.desc()).limit(limit)
    if matching is not None:
        jobs = jobs.where(Job.id.in_(select(Render.job_id).where(Render.id.in_(matching))))
        keep = set(session.scalars(matching))
    records = []
    for job in session.scalars(jobs):
        renders = [r for r in job.renders if matching is None or r.id in keep]
        results = _score_rows(session, [r.id for r in renders])
        records.append({
            "id": job.id, "name": job.name, "file": job.file_name,
            "file_path": job.file_path, "state": job.state, "priority": job.priority,
            "error": job.error, "warnings": job.warnings,
            "created_at": iso(job.created_at), "finished_at": iso(job.finished_at),
            "job": json.loads(job.spec_json) if job.spec_json else None,
            "renders": [_render_record(r, results.get(r.id, [])) for r in renders],
        })
    return records


def _render_record(render: Render, results: list[RenderScore]) -> dict[str, Any]:
    spec = json.loads(render.spec_json)
    by_kind: dict[str, dict[str, float]] = {"score": {}, "tag": {}, "gate": {}}
    for row in results:
        by_kind.setdefault(row.kind, {})[row.name] = row.value
    gate = by_kind["gate"]
    return {"index": render.index, "seed": render.seed, "state": render.state,
            "attempts": render.attempts, "output": render.output_path, "error": render.error,
            "prompt": spec["prompt"], "loras": spec.get("loras", []),
            "lora_patches": json.loads(render.lora_report_json)
            if render.lora_report_json else None,
            "frames": render.frames, "fps": render.fps,
            "quantization": spec.get("extra", {}).get("quantization"),
            # Post-processing ([[postprocess]]): scorer numbers, tagger tags with their
            # confidence, and the quality gate's verdict.
            "scores": by_kind["score"], "tags": by_kind["tag"],
            "flagged": "flagged" in gate or "reseeded" in gate,
            "reseeded": "reseeded" in gate,
            "reseed_of": int(gate["reseed_of"]) if "reseed_of" in gate else None}


# -- `lorafarm stats`, the live console --------------------------------------------------

def stats(store: Store) -> dict[str, Any]:
    """Throughput figures summed over the batches table, and an ETA for what is queued."""
    with store.session() as session:
        totals = session.execute(select(
            func.count(Batch.id), func.coalesce(func.sum(Batch.renders), 0),
            func.coalesce(func.sum(Batch.pipeline_loads), 0),
            func.coalesce(func.sum(Batch.lora_loads), 0),
            func.coalesce(func.sum(Batch.lora_switches), 0),
            func.coalesce(func.sum(Batch.tier_moves), 0),
            func.coalesce(func.sum(Batch.pipeline_seconds), 0.0),
            func.coalesce(func.sum(Batch.wall_seconds), 0.0),
        )).one()
        remaining = session.scalar(select(func.count(Render.id)).where(
            Render.state.in_((RENDER_QUEUED, RENDER_RUNNING)))) or 0
    batches, renders, loads, lora_loads, switches, tier_moves, pipeline_s, wall_s = totals
    per_render = wall_s / renders if renders else None
    return {
        "batches": batches, "renders": renders, "pipeline_loads": loads,
        "lora_loads": lora_loads, "lora_switches": switches, "tier_moves": tier_moves,
        "pipeline_seconds": round(pipeline_s, 3), "wall_seconds": round(wall_s, 3),
        "busy_fraction": round(pipeline_s / wall_s, 4) if wall_s else None,
        "renders_per_hour": round(3600 / per_render, 1) if per_render else None,
        "mean_batch_size": round(renders / batches, 2) if batches else None,
        "queued_or_running": remaining,
        "eta_seconds": round(remaining * per_render, 1) if per_render else None,
    }


# -- the morning report --------------------------------------------------------------------

def night_summary(session: Session, outputs: Path, since: dt.datetime) -> dict[str, Any]:
    """The figures of everything that ended since `since` (naive UTC, as the store keeps)."""
    until = utcnow()
    rows = session.execute(
        select(Render, Job.name, Job.file_name).join(Job, Job.id == Render.job_id)
        .where(Render.finished_at >= since,
               Render.state.in_((RENDER_DONE, RENDER_FAILED, RENDER_CANCELLED)))
        .order_by(Render.finished_at, Render.id)).all()
    counts = {RENDER_DONE: 0, RENDER_FAILED: 0, RENDER_CANCELLED: 0}
    per_checkpoint: dict[str, dict[str, int]] = {}
    sheet: list[dict[str, Any]] = []
    grids: dict[int, dict[str, Any]] = {}  # job id -> its sweep grid and pages
    failures: list[dict[str, Any]] = []
    for render, job_name, file_name in rows:
        counts[render.state] += 1
        figures = per_checkpoint.setdefault(render.checkpoint, {RENDER_DONE: 0,
                                                                RENDER_FAILED: 0,
                                                                RENDER_CANCELLED: 0})
        figures[render.state] += 1
        if render.state == RENDER_DONE:
            rel = output_relpath(outputs, render.output_path)
            spec = json.loads(render.spec_json)
            if render.job_id not in grids and spec.get("extra", {}).get("sweep"):
                grids[render.job_id] = {"job_id": render.job_id, "job": job_name, "files":
                                        grid_relpaths(outputs, render.job_id,
                                                               job_name)}
            sheet.append({"job_id": render.job_id, "job": job_name, "index": render.index,
                          "seed": render.seed, "checkpoint": render.checkpoint,
                          "prompt": spec.get("user_prompt") or spec.get("prompt", ""),
                          "file": rel, "poster": poster_relpath(rel),
                          "video": rel is not None and not rel.lower().endswith(".png")})
        elif render.state == RENDER_FAILED:
            failures.append({"job_id": render.job_id, "job": job_name, "file": file_name,
                             "index": render.index, "seed": render.seed,
                             "checkpoint": render.checkpoint, "error": render.error})
    # The night starts with its first batch, not at `since`: hours idle before the first job
    # was dropped are not time the farm could have been busy.
    first = session.scalar(select(func.min(Batch.started_at)).where(Batch.started_at >= since))
    first = first or session.scalar(select(func.min(Render.started_at)).where(
        Render.finished_at >= since, Render.started_at >= since))
    # ... and ends with its last render, however much later the report is written.
    last = max((render.finished_at for render, *_ in rows if render.finished_at),
               default=until)
    window = max((last - max(since, first or since)).total_seconds(), 0.0)
    busy = busy_seconds(session, since)
    loads, in_pipeline, batch_wall = session.execute(select(
        func.coalesce(func.sum(Batch.pipeline_loads), 0),
        func.coalesce(func.sum(Batch.pipeline_seconds), 0.0),
        func.coalesce(func.sum(Batch.wall_seconds), 0.0)).where(Batch.started_at >= since)).one()
    left = session.scalar(select(func.count()).select_from(Render).where(
        Render.state.in_((RENDER_QUEUED, RENDER_RUNNING)))) or 0
    return {
        "since": iso(since), "until": iso(until),
        "done": counts[RENDER_DONE], "failed": counts[RENDER_FAILED],
        "cancelled": counts[RENDER_CANCELLED], "still_queued": left,
        "busy_seconds": round(busy, 1), "window_seconds": round(window, 1),
        "first_started": iso(first),
        # Renders overlap in a batch, so busy time comes from pipeline calls, not renders.
        "busy_fraction": round(min(busy / window, 1.0), 3) if window > 0 else None,
        # Of the busy time, the share inside pipeline calls (the rest: loads, LoRA switches,
        # writing outputs).
        "pipeline_fraction": (round(in_pipeline / batch_wall, 3) if batch_wall else None),
        "pipeline_loads": int(loads),
        "per_checkpoint": per_checkpoint,
        "renders": sheet,
        "failures": failures,
        "grids": [entry for entry in grids.values() if entry["files"]],
    }


def console_snapshot(store: Store) -> dict[str, Any]:
    """What is running (with step progress), what is queued, and the ETA."""
    with store.session() as session:
        running = session.execute(
            select(Render.id, Job.name, Render.index, Render.seed, Render.progress_step,
                   Render.progress_total, Render.worker, Render.checkpoint)
            .join(Job, Job.id == Render.job_id)
            .where(Render.state == RENDER_RUNNING).order_by(Render.id)).all()
        counts = dict(session.execute(select(Render.state, func.count())
                                      .group_by(Render.state)).all())
    return {"running": [row._asdict() for row in running], "counts": counts,
            "stats": stats(store)}


def unfinished_renders(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Render).where(
        Render.state.in_((RENDER_QUEUED, RENDER_RUNNING)))) or 0


def first_unfinished_created(session: Session) -> dt.datetime | None:
    """When the oldest render still queued or running was created: a night's start."""
    return session.scalar(select(func.min(Render.created_at))
                          .where(Render.state.in_((RENDER_QUEUED, RENDER_RUNNING))))


def first_created_finished_after(session: Session, moment: dt.datetime) -> dt.datetime | None:
    """When the oldest render that finished after `moment` was created."""
    return session.scalar(select(func.min(Render.created_at))
                          .where(Render.finished_at > moment))


def render_counts(session: Session, *, finished_since: dt.datetime | None = None,
                  job_id: int | None = None) -> dict[str, int]:
    """Renders by state: all of them, those finished since a moment, or one job's."""
    query = select(Render.state, func.count())
    if finished_since is not None:
        query = query.where(Render.finished_at >= finished_since)
    if job_id is not None:
        query = query.where(Render.job_id == job_id)
    return dict(session.execute(query.group_by(Render.state)).all())


def done_outputs(session: Session, job_id: int) -> list[tuple[int, str | None]]:
    """A job's done renders as (index, output path), in index order."""
    return [tuple(row) for row in session.execute(
        select(Render.index, Render.output_path).where(
            Render.job_id == job_id, Render.state == RENDER_DONE).order_by(Render.index))]


# -- /metrics ---------------------------------------------------------------------------------

def event_counts(session: Session, kinds: tuple[str, ...]) -> dict[str, int]:
    return {kind: n for kind, n in session.execute(
        select(Event.kind, func.count()).where(Event.kind.in_(kinds)).group_by(Event.kind))}


def batch_totals(session: Session) -> tuple[int, int, float, int]:
    """Pipeline loads, LoRA loads, wall seconds and the number of pipeline calls, ever."""
    loads, lora_loads, busy, calls = session.execute(select(
        func.coalesce(func.sum(Batch.pipeline_loads), 0),
        func.coalesce(func.sum(Batch.lora_loads), 0),
        func.coalesce(func.sum(Batch.wall_seconds), 0.0),
        func.count(Batch.id))).one()
    return int(loads), int(lora_loads), float(busy), int(calls)
