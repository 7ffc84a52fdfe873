"""The history: SQLAlchemy 2 typed ORM models and the engine that holds them.

The database is the single source of truth for state; the job folders mirror it. The schema
is created and upgraded only by Alembic migrations (`daemon/store/migrations`), never by
`create_all`, so that an upgrade never loses history.

SQLite practice for a database several processes share: WAL (readers never block the
writer), busy_timeout, foreign keys on every connection; the daemon writes inside
`BEGIN IMMEDIATE` so two writers queue up instead of failing half-way; readers (CLI) use
short deferred transactions. Nothing in the claim path is SQLite-only:
`UPDATE ... WHERE state = 'queued' ... RETURNING` works on PostgreSQL too.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def lease_now(session: Session) -> dt.datetime:
    """Now, for leases: by the database server's clock where several hosts share it
    (PostgreSQL), else by this machine's. A lease one host writes and another judges must be
    read on one clock: hosts whose clocks differ by more than lease_seconds would otherwise
    take each other's running renders."""
    if session.get_bind().dialect.name == "postgresql":
        return session.execute(text("SELECT timezone('UTC', now())")).scalar_one()
    return utcnow()


class Base(DeclarativeBase):
    pass


# Job states. A job is `queued` until its first render starts, then `running`, and ends
# `done` (every render done), `failed` (at least one render failed) or `rejected` (never
# accepted: the file was invalid; the row keeps the reason for the history).
JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED, JOB_REJECTED = (
    "queued", "running", "done", "failed", "rejected")
UNFINISHED_JOB_STATES = (JOB_QUEUED, JOB_RUNNING)

# Render states: queued -> running -> done | failed | cancelled. A running render whose
# process died is put back to queued at the next start until it has used up its attempts.
RENDER_QUEUED, RENDER_RUNNING, RENDER_DONE, RENDER_FAILED, RENDER_CANCELLED = (
    "queued", "running", "done", "failed", "cancelled")
ENDED_RENDER_STATES = (RENDER_DONE, RENDER_FAILED, RENDER_CANCELLED)


# Inventory rows (checkpoints, LoRAs) belong to the daemon that indexed them: several hosts
# sharing one database each have their own files. A lone daemon is simply the only host.
class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("host", "name", name="uq_checkpoints_host_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(128), default="local", index=True)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))  # "folder" | "single_file" | "gguf"
    family: Mapped[str | None] = mapped_column(String(64))
    lineage: Mapped[str | None] = mapped_column(String(64))
    variant: Mapped[str | None] = mapped_column(String(64))
    recognised_by: Mapped[str | None] = mapped_column(String(64))  # header, config, sidecar
    config_path: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))
    model_hash: Mapped[str | None] = mapped_column(String(16))  # A1111 / Civitai AutoV2
    state: Mapped[str] = mapped_column(String(32))  # ok | unrecognised | missing
    reason: Mapped[str | None] = mapped_column(Text)
    # "GGUF Q8_0", "FP8 e4m3fn"; null: stored as released (or not recognised)
    quantization: Mapped[str | None] = mapped_column(String(64))
    transformer_2: Mapped[str | None] = mapped_column(Text)  # a GGUF pair's low-noise expert
    # The files its pipeline's parts load from instead of the config folder's weights (the
    # family's `component_sources`: named, or paired from the UI trees), as JSON {part: path},
    # so that `lorafarm models` can show them without loading the family plugins. Null: not
    # scanned by a lorafarm that records them yet.
    components_json: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Lora(Base):
    """A LoRA file under loras/, known from its header alone (nothing is loaded to index it).

    Identity is the content (sha256 of the whole file): a renamed or moved file keeps its row.
    States: ok, quarantined (never loaded; `reason` says why), missing (file gone)."""

    __tablename__ = "loras"
    __table_args__ = (UniqueConstraint("host", "path", name="uq_loras_host_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(128), default="local", index=True)
    name: Mapped[str] = mapped_column(String(255), index=True)  # file stem
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    autov2: Mapped[str | None] = mapped_column(String(16))  # sha256(file)[:10]
    autov3: Mapped[str | None] = mapped_column(String(16))  # sha256(tensor data)[:12]
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    layout: Mapped[str | None] = mapped_column(String(64))
    family: Mapped[str | None] = mapped_column(String(64))
    architecture: Mapped[str | None] = mapped_column(String(64))
    lineage: Mapped[str | None] = mapped_column(String(64))
    lineage_source: Mapped[str | None] = mapped_column(Text)  # what decided the lineage
    variant: Mapped[str | None] = mapped_column(String(64))
    expert: Mapped[str | None] = mapped_column(String(16))  # Wan 2.2: high | low | both
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column()
    triggers_json: Mapped[str] = mapped_column(Text, default="[]")
    base_model: Mapped[str | None] = mapped_column(Text)  # ss_sd_model_name
    base_model_hash: Mapped[str | None] = mapped_column(String(64))  # ss_new_sd_model_hash
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    @property
    def triggers(self) -> list[str]:
        return list(json.loads(self.triggers_json or "[]"))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))  # the job file's stem
    file_name: Mapped[str] = mapped_column(String(255))  # as dropped into jobs/
    file_path: Mapped[str | None] = mapped_column(Text)  # where the file is now
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    spec_json: Mapped[str | None] = mapped_column(Text)  # the validated job, as JSON
    warnings_json: Mapped[str] = mapped_column(Text, default="[]")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # When the job's end was acted on (its file filed, its sweep grid written, `job_finished`
    # sent to plugins), by daemon/runtime/job_end.py; null while it runs, and from its end
    # until then. Setting it is the claim that makes one daemon, once, act on the end.
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    renders: Mapped[list[Render]] = relationship(back_populates="job", order_by="Render.index")

    @property
    def warnings(self) -> list[str]:
        return list(json.loads(self.warnings_json or "[]"))


class Render(Base):
    __tablename__ = "renders"
    __table_args__ = (
        Index("ix_renders_claim", "state", "priority", "id"),
        # "prefer what is loaded": the best queued render of one checkpoint / one batch key.
        Index("ix_renders_checkpoint", "state", "checkpoint", "priority", "id"),
        Index("ix_renders_batch_key", "state", "batch_key", "priority", "id"),
        # Renders caught in a process death, retried alone before the rest of the queue.
        Index("ix_renders_retry_alone", "state", "deaths"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)  # 0..count-1 within the job
    seed: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Process deaths this render was caught in, blamed on it or not (see
    # lifecycle.recover_interrupted); above 0 it runs alone, before the rest of the queue.
    deaths: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    priority: Mapped[int] = mapped_column(Integer, default=0)  # copied from the job for claims
    checkpoint: Mapped[str] = mapped_column(String(255))
    batch_key: Mapped[str] = mapped_column(Text)  # equal keys may share a pipeline call
    spec_json: Mapped[str] = mapped_column(Text)  # RenderSpec as JSON
    output_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    # Per LoRA, the modules it patched in each component: {"name": {"unet": 140, ...}}.
    lora_report_json: Mapped[str | None] = mapped_column(Text)
    frames: Mapped[int | None] = mapped_column(Integer)  # video outputs
    fps: Mapped[int | None] = mapped_column(Integer)
    # Live progress of the running attempt (pipeline step callback) and its lease.
    progress_step: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    worker: Mapped[str | None] = mapped_column(String(128))  # who holds the running attempt
    batch_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    job: Mapped[Job] = relationship(back_populates="renders")


class Batch(Base):
    """One pipeline call's figures, for `lorafarm stats` and the scheduler benchmark."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(64))
    checkpoint: Mapped[str] = mapped_column(String(255))
    renders: Mapped[int] = mapped_column(Integer)
    pipeline_loads: Mapped[int] = mapped_column(Integer, default=0)
    lora_loads: Mapped[int] = mapped_column(Integer, default=0)
    lora_switches: Mapped[int] = mapped_column(Integer, default=0)
    # Pipelines moved between the device and the RAM tier for this batch (either way): a
    # move is not a load, but it is time the device waits.
    tier_moves: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pipeline_seconds: Mapped[float] = mapped_column(default=0.0)  # inside the pipeline call
    wall_seconds: Mapped[float] = mapped_column(default=0.0)  # claim to last output recorded
    outcome: Mapped[str] = mapped_column(String(32), default="done")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Host(Base):
    """A daemon sharing the queue: who it is, what it holds, when it last said so."""

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    devices_json: Mapped[str] = mapped_column(Text, default="[]")
    loaded_json: Mapped[str] = mapped_column(Text, default="{}")  # worker -> checkpoints
    current_batch: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32), default="running")  # running | stopped
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


PAUSED_KEY = "paused"  # Setting: "1" while no new renders are claimed


class Setting(Base):
    """Small daemon-wide switches that the CLI and the status page set (e.g. paused)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Event(Base):
    """Append-only log: state changes, errors and timings. Never updated, never deleted."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    render_id: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text, default="")
    data_json: Mapped[str] = mapped_column(Text, default="{}")


class FileHash(Base):
    """sha256 of a whole file, valid while its (path, size, mtime) stay the same."""

    __tablename__ = "file_hashes"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    computed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def add_event(session: Session, kind: str, message: str = "", *, job_id: int | None = None,
              render_id: int | None = None, **data: Any) -> None:
    session.add(Event(kind=kind, message=message, job_id=job_id, render_id=render_id,
                      data_json=json.dumps(data, default=str, sort_keys=True)))


class Store:
    """One database: an engine plus short-lived sessions.

    `writer=True` (the daemon) starts every transaction with BEGIN IMMEDIATE on SQLite so
    that concurrent writers wait on busy_timeout instead of failing at commit time.
    """

    def __init__(self, url: str, *, writer: bool = True, pool_size: int = 0) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        options: dict[str, Any] = {} if self.is_sqlite else {"pool_pre_ping": True}
        if pool_size and not self.is_sqlite:
            # At most this many connections: a thread that finds them all in use waits for
            # one (sessions are short) instead of opening another.
            options.update(pool_size=pool_size, max_overflow=0, pool_timeout=120)
        self.engine: Engine = create_engine(url, future=True, **options)
        if self.is_sqlite:
            _configure_sqlite(self.engine, writer=writer)

    @classmethod
    def for_url(cls, url: str, *, writer: bool = True, pool_size: int = 0) -> Store:
        """SQLite (file created user-only) or PostgreSQL, from a database URL."""
        if url.startswith("sqlite:///"):
            return cls.for_path(Path(url[len("sqlite:///"):]), writer=writer)
        return cls(url, writer=writer, pool_size=pool_size)

    @classmethod
    def for_path(cls, path: Path, *, writer: bool = True) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        store = cls(f"sqlite:///{path}", writer=writer)
        if fresh:
            # Create the file now with user-only permissions: it holds every prompt.
            with store.engine.connect():
                pass
            os.chmod(path, 0o600)
        return store

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on any exception."""
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            if not self.is_sqlite:
                # Several daemons of a farm start together: one migrates, the others wait
                # for its transaction and then find the schema current.
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727001)")
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

    def backup(self, destination: Path) -> Path:
        """A consistent copy of the SQLite database, taken with SQLite's online backup API
        (safe while the daemon writes; readers and the writer are not blocked for long)."""
        import sqlite3

        if not self.is_sqlite:
            raise ValueError("backup copies SQLite databases; use pg_dump for PostgreSQL")
        destination = Path(destination)
        if destination.is_dir() or not destination.suffix:  # a folder: a dated copy in it
            destination = destination / f"lorafarm-{utcnow():%Y%m%d-%H%M%S}.sqlite"
        destination.parent.mkdir(parents=True, exist_ok=True)
        source_path = self.engine.url.database
        with sqlite3.connect(source_path) as source, sqlite3.connect(destination) as target:
            source.backup(target, pages=1024)
        os.chmod(destination, 0o600)
        return destination

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine, *, writer: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        # NORMAL survives a process crash (what a daemon meets); FULL also survives power loss.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


class RenderScore(Base):
    """What post-processing said about a render's image: a number per scorer label
    (kind "score"), the tags a tagger found (kind "tag", value = confidence) and quality-gate
    verdicts (kind "gate": "flagged" / "reseeded" / "reseed_of", value = score or render id).
    Indexed for `lorafarm history --tag` and `--min-score`."""

    __tablename__ = "render_scores"
    __table_args__ = (Index("ix_render_scores_lookup", "kind", "name", "value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    render_id: Mapped[int] = mapped_column(ForeignKey("renders.id", ondelete="CASCADE"),
                                           index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    value: Mapped[float] = mapped_column()
