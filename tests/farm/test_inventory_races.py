"""Two scans or two hashers of one inventory at the same moment (PostgreSQL, which runs
transactions side by side): the intake loop and the main thread of one daemon both scanning
loras/, two daemons on one machine under one inventory name, two hosts hashing a checkpoint
on their shared models/ folder, and a checkpoint replaced while it is being hashed."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import daemon.library.registry as registry_module
from daemon.config import Config, config_from_dict
from daemon.contract.loader import Plugins
from daemon.library.loras import LoraLibrary
from daemon.library.registry import Registry
from daemon.store.models import Checkpoint, FileHash, Lora, Store, utcnow
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original


@pytest.fixture
def config(tmp_path: Path) -> Config:
    data = {"paths": {"jobs": "jobs", "loras": "loras", "models": "models", "inputs": "inputs",
                      "outputs": "outputs", "state": "state"},
            "intake": {"settle_seconds": 0.0}}
    config = config_from_dict(data, base=tmp_path, source=tmp_path / "config.toml")
    config.paths.loras.mkdir(parents=True)
    config.paths.models.mkdir(parents=True)
    return config


@pytest.fixture
def store(postgres_url: str) -> Iterator[Store]:
    store = Store.for_url(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    store.migrate()
    yield store
    store.dispose()


def _held_in(method_owner: type, name: str, monkeypatch: pytest.MonkeyPatch,
             inside: threading.Event, release: threading.Event) -> None:
    """Make `method_owner.name` stop, in the thread called "first", until `release`: that
    thread's scan is then inside its transaction, having read the rows and found none."""
    real: Callable[..., Any] = getattr(method_owner, name)

    def held(self: Any, *args: Any) -> Any:
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)
        return real(self, *args)

    monkeypatch.setattr(method_owner, name, held)


def _scan_twice_at_once(scans: tuple[Callable[[], object], Callable[[], object]],
                        inside: threading.Event, release: threading.Event) -> list[BaseException]:
    """Start the first scan, and the second while the first is inside its transaction; the
    second must wait for the first. Returns the scans' errors."""
    errors: list[BaseException] = []
    second_done = threading.Event()

    def run(scan: Callable[[], object], done: threading.Event | None) -> None:
        try:
            scan()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            inside.set()
            if done is not None:
                done.set()

    first = threading.Thread(target=run, args=(scans[0], None), name="first")
    second = threading.Thread(target=run, args=(scans[1], second_done), name="second")
    first.start()
    try:
        assert inside.wait(10)
        second.start()
        assert not second_done.wait(0.5), "the second scan did not wait for the first"
    finally:
        release.set()
        first.join(10)
        if second.ident is not None:  # started
            second.join(10)
    return errors


@pytest.mark.parametrize("daemons", [1, 2], ids=["intake-and-idle-of-one-daemon",
                                                  "two-daemons-one-inventory-name"])
def test_a_new_lora_seen_by_two_scans_at_once_is_indexed_once(
        daemons: int, config: Config, store: Store, plugins: Plugins,
        monkeypatch: pytest.MonkeyPatch) -> None:
    libraries = [LoraLibrary(config, store, plugins, host="gpu1") for _ in range(daemons)]
    first, second = libraries[0], libraries[-1]
    write_kohya_original(make_tiny_lora(seed=1), config.paths.loras / "ink.safetensors")
    inside, release = threading.Event(), threading.Event()
    _held_in(LoraLibrary, "_recognise", monkeypatch, inside, release)

    errors = _scan_twice_at_once((first.scan, second.scan), inside, release)

    assert errors == []
    with store.session() as session:
        rows = session.scalars(select(Lora)).all()
    assert [(row.name, row.host, row.state) for row in rows] == [("ink", "gpu1", "ok")]
    assert [info.name for info in second.scan()] == ["ink"]


def test_a_new_checkpoint_seen_by_two_daemons_of_one_inventory_name_is_indexed_once(
        config: Config, store: Store, plugins: Plugins,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # `lorafarm models` beside a running daemon scans the same inventory.
    registries = [Registry(config, store, plugins, host="gpu1") for _ in range(2)]
    (config.paths.models / "old.ckpt").write_bytes(b"pickle")
    inside, release = threading.Event(), threading.Event()
    _held_in(Registry, "_recognise", monkeypatch, inside, release)

    errors = _scan_twice_at_once((registries[0].scan, registries[1].scan), inside, release)

    for registry in registries:
        registry.close()
    assert errors == []
    with store.session() as session:
        rows = session.scalars(select(Checkpoint)).all()
    assert [(row.name, row.host, row.state) for row in rows] == [("old", "gpu1",
                                                                 "unrecognised")]


def _checkpoint(config: Config, store: Store, plugins: Plugins, host: str,
                content: bytes) -> tuple[Registry, Path]:
    """A usable single-file checkpoint `m` of `host`, its hash not known yet (as a scan
    leaves it), and that host's registry."""
    path = config.paths.models / "m.safetensors"
    if not path.exists():
        path.write_bytes(content)
    stat = path.stat()
    with store.session() as session:
        session.add(Checkpoint(name="m", host=host, path=str(path), kind="single_file",
                               family="sdxl", state="ok", size_bytes=stat.st_size,
                               mtime_ns=stat.st_mtime_ns))
    return Registry(config, store, plugins, host=host), path


def _replace(path: Path, content: bytes) -> None:
    """A new download of the file put in place the careful way: temp name, then rename."""
    temp = path.with_name(path.name + ".part")
    temp.write_bytes(content)
    os.replace(temp, path)


def _recorded(store: Store, path: Path) -> tuple[str | None, str | None]:
    """The checkpoint row's sha256 and the hash cache's, for `path`."""
    with store.session() as session:
        row = session.scalars(select(Checkpoint).where(Checkpoint.path == str(path))).one()
        cached = session.get(FileHash, str(path))
        return row.sha256, cached.sha256 if cached is not None else None


def test_two_hosts_hashing_one_shared_checkpoint_both_get_its_hash(
        config: Config, store: Store, plugins: Plugins) -> None:
    registry, path = _checkpoint(config, store, plugins, "b", b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    stat = path.stat()
    recorded, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def host_a_records_its_hash() -> None:  # host A finished hashing the shared file first
        try:
            with store.session() as session:
                session.add(FileHash(path=str(path), size_bytes=stat.st_size,
                                     mtime_ns=stat.st_mtime_ns, sha256=digest,
                                     computed_at=utcnow()))
                session.flush()
                recorded.set()
                release.wait(10)  # keep the transaction open: the race window
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            recorded.set()

    host_a = threading.Thread(target=host_a_records_its_hash)
    host_a.start()
    try:
        assert recorded.wait(10)
        # A worker of host B writes the first output and waits for the hash.
        waiting = registry._schedule_hash(registry.get("m"))  # type: ignore[arg-type]
        with pytest.raises(TimeoutError):
            waiting.result(timeout=0.5)  # B's hash record waits for A's transaction
    finally:
        release.set()
        host_a.join(10)
    try:
        assert waiting.result(timeout=10) == digest[:10]
        assert registry.model_hash("m", wait=True) == digest[:10]
    finally:
        registry.close()
    assert errors == []
    assert _recorded(store, path) == (digest, digest)


def test_a_checkpoint_replaced_while_it_is_hashed_gets_the_new_files_hash(
        config: Config, store: Store, plugins: Plugins,
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry, path = _checkpoint(config, store, plugins, "a", b"old weights")
    real = registry_module.sha256_file
    calls: list[Path] = []

    def hash_while_a_new_download_lands(target: Path) -> str:
        digest = real(target)  # the old file, read through before the rename below
        calls.append(target)
        if len(calls) == 1:
            _replace(path, b"new weights, longer")
        return digest

    monkeypatch.setattr(registry_module, "sha256_file", hash_while_a_new_download_lands)
    try:
        model_hash = registry.model_hash("m", wait=True)
    finally:
        registry.close()
    new = hashlib.sha256(b"new weights, longer").hexdigest()
    assert model_hash == new[:10]
    assert _recorded(store, path) == (new, new)
    assert len(calls) == 2


def test_a_checkpoint_replaced_after_it_was_hashed_is_hashed_again(
        config: Config, store: Store, plugins: Plugins) -> None:
    registry, path = _checkpoint(config, store, plugins, "a", b"old weights")
    try:
        assert registry.model_hash("m", wait=True) == hashlib.sha256(
            b"old weights").hexdigest()[:10]
        _replace(path, b"new weights, longer")
        stat = path.stat()
        with store.session() as session:  # what the next scan does for a changed file
            row = session.scalars(select(Checkpoint).where(Checkpoint.name == "m")).one()
            row.size_bytes, row.mtime_ns = stat.st_size, stat.st_mtime_ns
            row.sha256 = row.model_hash = None
        model_hash = registry.model_hash("m", wait=True)
    finally:
        registry.close()
    new = hashlib.sha256(b"new weights, longer").hexdigest()
    assert model_hash == new[:10]
    assert _recorded(store, path) == (new, new)
