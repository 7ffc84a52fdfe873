"""Textual-inversion embeddings: the files under embeddings/ (and the ComfyUI / A1111 trees'
embedding folders, read in place), and which of them a prompt uses.

A1111's rule: an embedding's name (its file stem) used as a word of the prompt or negative
prompt, in any case, means the embedding, also inside weighting brackets `(name:1.2)`. Only
`.safetensors` files are read; pickled `.pt` / `.bin` files are quarantined with the reason
and never loaded. Each file's header is shown to every family plugin (`probe_embedding`) to
learn which architecture it is for; its hash is Civitai's AutoV2 (the first 10 hex digits of
the file's sha256), which A1111 writes as `TI hashes` and re-renders look up first.

The index lives in memory and is rebuilt by `scan()` (intake scans before every job; only
changed files are hashed again): embeddings are small and few, and nothing else needs a
history of them.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.contract.faults import PLUGIN_ERRORS
from daemon.formats.safetensors_header import SafetensorsError, read_header

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.contract.loader import Plugins

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"}
OK, QUARANTINED, UNRECOGNISED = "ok", "quarantined", "unrecognised"


@dataclass(frozen=True)
class EmbeddingInfo:
    name: str  # the file stem: the word that calls it in a prompt
    path: Path
    state: str  # ok | quarantined (never loaded) | unrecognised (no family takes it)
    reason: str
    architecture: str | None = None  # "sdxl": usable by every family of that architecture
    family: str | None = None  # the family that recognised it (for display)
    vectors: int | None = None  # tokens it stands for
    sha256: str | None = None
    autov2: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {**self.__dict__, "path": str(self.path)}


class EmbeddingLibrary:
    def __init__(self, config: Config, plugins: Plugins) -> None:
        self.config = config
        self.plugins = plugins
        self._lock = threading.Lock()
        self._known: dict[str, tuple[tuple[int, int], EmbeddingInfo]] = {}

    def scan(self) -> list[EmbeddingInfo]:
        """Bring the index in line with the folders; returns every embedding file found."""
        with self._lock:
            found: dict[str, tuple[tuple[int, int], EmbeddingInfo]] = {}
            for root in self.config.paths.embedding_folders:
                if not root.is_dir():
                    continue
                for path in sorted(root.rglob("*")):
                    suffix = path.suffix.lower()
                    if (not path.is_file() or path.name.startswith(".")
                            or (suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES)):
                        continue
                    try:
                        stat = path.stat()
                    except OSError:
                        continue
                    stamp = (stat.st_size, stat.st_mtime_ns)
                    known = self._known.get(str(path))
                    info = known[1] if known and known[0] == stamp else self._recognise(path)
                    found[str(path)] = (stamp, info)
            self._known = found
            return [info for _, info in found.values()]

    def all(self) -> list[EmbeddingInfo]:
        with self._lock:
            return [info for _, info in self._known.values()]

    def _recognise(self, path: Path) -> EmbeddingInfo:
        name = path.stem
        if path.suffix.lower() in PICKLE_SUFFIXES:
            return EmbeddingInfo(name, path, QUARANTINED,
                                 f"{path.suffix} files are Python pickles, which can run code "
                                 "when loaded; lorafarm never loads them. Use the .safetensors "
                                 "version of this embedding")
        try:
            header = read_header(path)
        except SafetensorsError as exc:
            return EmbeddingInfo(name, path, QUARANTINED, str(exc))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        found = []
        for family in self.plugins.families.values():
            try:
                probe = family.probe_embedding(header)
            except PLUGIN_ERRORS as exc:  # one plugin's bug must not hide the others' answers
                log.warning("family %s's probe_embedding raised on %s: %s (a bug in that "
                            "plugin)", family.name, path.name, exc)
                continue
            if probe is not None:
                found.append((family, probe))
        if found:
            # Families of one architecture (SDXL, Pony, Illustrious) share text encoders and
            # all answer: name the architecture's own family where it is installed.
            family, probe = next(((f, p) for f, p in found if f.name == f.architecture),
                                 found[0])
            return EmbeddingInfo(name, path, OK, probe.reason,
                                 architecture=family.architecture, family=family.name,
                                 vectors=probe.vectors, sha256=digest, autov2=digest[:10])
        shapes = ", ".join(f"{key} {list(info.shape)}" for key, info in header.tensors.items())
        return EmbeddingInfo(name, path, UNRECOGNISED,
                             f"no installed family takes an embedding of this form ({shapes})",
                             sha256=digest, autov2=digest[:10])

    # -- what a prompt uses ------------------------------------------------------------------

    def named_in(self, *texts: str) -> list[EmbeddingInfo]:
        """Every embedding whose name is a word of one of `texts` (A1111's rule: any case, at
        word boundaries), usable or not; by name, one file per name."""
        by_name: dict[str, EmbeddingInfo] = {}
        for info in self.all():
            by_name.setdefault(info.name.lower(), info)
        used = []
        for lowered, info in by_name.items():
            pattern = re.compile(rf"(?<![\w]){re.escape(lowered)}(?![\w])", re.IGNORECASE)
            if any(pattern.search(text) for text in texts):
                used.append(info)
        return sorted(used, key=lambda info: info.name)

    def find_by_hash(self, key: str) -> EmbeddingInfo | None:
        key = key.strip().lower()
        if len(key) < 10:
            return None
        return next((info for info in self.all() if info.state == OK and info.sha256
                     and info.sha256.startswith(key)), None)

    def close_names(self, name: str) -> list[str]:
        return difflib.get_close_matches(name, sorted({i.name for i in self.all()}), n=3,
                                         cutoff=0.5)
