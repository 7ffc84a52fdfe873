"""The daemons of a farm: each registers itself, heartbeats, and keeps its renders' leases
alive. A daemon that stops heartbeating loses its renders to the queue after
`lease_seconds` (see `lifecycle.recover_interrupted`); its inventory rows are forgotten,
and its host row once it has been dead for `forget_hosts_after_seconds`."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from typing import Any

from sqlalchemy import delete, select, update

from daemon.config import Config
from daemon.store.models import RENDER_RUNNING, Checkpoint, Host, Lora, Render, Store, lease_now


def register_host(store: Store, name: str, devices: list[str]) -> None:
    with store.session() as session:
        now = lease_now(session)
        session.merge(Host(name=name, hostname=socket.gethostname(), pid=os.getpid(),
                           devices_json=json.dumps(devices), loaded_json="{}",
                           current_batch=None, state="running", started_at=now,
                           heartbeat_at=now))


def heartbeat(store: Store, name: str, loaded: dict[str, list[str]]) -> None:
    """One heartbeat: the host row, and the lease of every render this daemon holds."""
    with store.session() as session:
        now = lease_now(session)
        held = session.scalars(select(Render.batch_id).where(
            Render.state == RENDER_RUNNING, Render.worker.startswith(f"{name}/"))).all()
        updated = session.execute(update(Host).where(Host.name == name).values(
            heartbeat_at=now, loaded_json=json.dumps(loaded), state="running",
            current_batch=max(held) if held else None)).rowcount
        if not updated:
            # Forgotten while silent (suspended for longer than forget_hosts_after_seconds):
            # back in the list.
            session.merge(Host(name=name, hostname=socket.gethostname(), pid=os.getpid(),
                               devices_json="[]", loaded_json=json.dumps(loaded),
                               current_batch=max(held) if held else None, state="running",
                               started_at=now, heartbeat_at=now))
        session.execute(update(Render).where(Render.state == RENDER_RUNNING,
                                             Render.worker.startswith(f"{name}/"))
                        .values(heartbeat_at=now))


def stop_host(store: Store, name: str) -> None:
    with store.session() as session:
        session.execute(update(Host).where(Host.name == name).values(state="stopped",
                                                                     current_batch=None))


def _dead_since(session: Any, config: Config) -> dt.datetime:
    """Hosts that have not heartbeat since this are gone from `lorafarm hosts`."""
    keep = max(config.forget_hosts_after_seconds, config.lease_seconds)
    return lease_now(session) - dt.timedelta(seconds=keep)


def forget_dead_hosts(store: Store, config: Config) -> int:
    """Delete the rows of hosts dead (stopped or silent) for `forget_hosts_after_seconds`:
    the table lists the farm's hosts, not every start of a daemon. Returns how many."""
    with store.session() as session:
        return session.execute(delete(Host).where(
            Host.heartbeat_at < _dead_since(session, config))).rowcount or 0


def forget_dead_inventories(store: Store, config: Config, keep: str, *, lone: bool) -> None:
    """Drop the model and LoRA index rows of hosts that are gone. A lone daemon (SQLite,
    holding the state lock) is the only host there is; in a farm, a host is gone once its
    heartbeat is older than the lease."""
    with store.session() as session:
        if lone:
            gone: Any = select(Checkpoint.host).where(Checkpoint.host != keep).distinct()
            hosts = set(session.scalars(gone)) | set(session.scalars(
                select(Lora.host).where(Lora.host != keep).distinct()))
        else:
            cutoff = lease_now(session) - dt.timedelta(seconds=config.lease_seconds)
            alive = set(session.scalars(select(Host.name).where(Host.heartbeat_at >= cutoff,
                                                                Host.state == "running")))
            known = set(session.scalars(select(Checkpoint.host).distinct())) | set(
                session.scalars(select(Lora.host).distinct()))
            hosts = {h for h in known if h != keep and h not in alive
                     and not any(a == h or a.startswith(f"{h}-") for a in alive)}
        if hosts:
            session.execute(delete(Checkpoint).where(Checkpoint.host.in_(hosts)))
            session.execute(delete(Lora).where(Lora.host.in_(hosts)))


def host_records(store: Store, config: Config) -> list[dict[str, Any]]:
    with store.session() as session:
        cutoff = lease_now(session) - dt.timedelta(seconds=config.lease_seconds)
        # Dead longer than forget_hosts_after_seconds: not listed, even before a daemon
        # deletes the row.
        rows = session.scalars(select(Host).where(Host.heartbeat_at >= _dead_since(
            session, config)).order_by(Host.name)).all()
        return [{"name": h.name, "hostname": h.hostname, "pid": h.pid,
                 "devices": json.loads(h.devices_json), "loaded": json.loads(h.loaded_json),
                 "current_batch": h.current_batch,
                 "state": h.state if h.state != "running" or h.heartbeat_at >= cutoff
                 else "lost (no heartbeat)",
                 "started_at": h.started_at.isoformat(timespec="seconds") + "Z",
                 "last_heartbeat": h.heartbeat_at.isoformat(timespec="seconds") + "Z"}
                for h in rows]
