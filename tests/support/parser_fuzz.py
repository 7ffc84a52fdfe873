"""Fuzzing every registered job parser through the real intake: random bytes, files of one
format under another suffix (TOML saved as .png, a PNG saved as .toml, ...), truncations and
mutations of a valid file of each suffix, including a real lorafarm PNG and MP4 written by the
output writer's own functions. Every case must end accepted or rejected with a report
(JobFileError); anything else raised is a crash, counted with an example.

    .venv/bin/python -m tests.support.parser_fuzz --cases 5000 [--seed 7]

runs a soak on the tiny demo models and prints the figures (`tests.support.reliability_report
--fuzz-parsers N` puts them into docs/RELIABILITY.md); tests/unit/test_parser_fuzz.py runs a short,
seeded round in the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

VALID_TOML = ('checkpoint = "tiny-sdxl"\nprompt = "a lighthouse"\nseed = 3\ncount = 1\n'
              'steps = 4\ncfg = 5.0\nsampler = "DPM++ 2M Karras"\nwidth = 64\nheight = 64\n')
KINDS = ("random bytes", "wrong format", "truncated", "mutated")


def valid_samples(intake: Any, plugins: Any, folder: Path) -> dict[str, bytes]:
    """A valid file for each suffix lorafarm itself reads: the TOML job, the same job as
    JSON, and a PNG and an MP4 written by lorafarm's output functions with the job's first
    render spec and the metadata plugins' entries (what the output writer writes)."""
    import tomllib

    from PIL import Image

    from daemon.output.files import write_mp4, write_png

    _, renders, _ = intake.resolver.parse("sample.toml", VALID_TOML.encode())
    spec = renders[0]
    text = plugins.output_metadata(spec, plugins.families[spec.family])
    rng = random.Random(0)
    frames = [Image.frombytes("RGB", (32, 32), rng.randbytes(32 * 32 * 3)) for _ in range(3)]
    png = write_png(frames[0], folder / "sample.png", spec, text)
    mp4 = write_mp4(frames, 8, folder / "sample.mp4", spec, text)
    return {".toml": VALID_TOML.encode(),
            ".json": json.dumps(tomllib.loads(VALID_TOML)).encode(),
            ".png": png.read_bytes(), ".mp4": mp4.read_bytes()}


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """Damage files really get: bytes flipped, a run deleted, duplicated or overwritten with
    noise, a block inserted."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        if not data:
            data += rng.randbytes(rng.randint(1, 16))
            continue
        start = rng.randrange(len(data))
        length = min(len(data) - start, rng.choice((1, 2, 4, 16, 64)))
        operation = rng.randrange(5)
        if operation == 0:
            for i in range(start, start + length):
                data[i] ^= 1 << rng.randrange(8)
        elif operation == 1:
            del data[start:start + length]
        elif operation == 2:
            data[start:start] = data[start:start + length]
        elif operation == 3:
            data[start:start + length] = rng.randbytes(length)
        else:
            data[start:start] = rng.randbytes(rng.randint(1, 32))
    return bytes(data)


def cases(rng: random.Random, samples: dict[str, bytes], suffixes: list[str],
          count: int) -> Iterator[tuple[str, str, bytes]]:
    """`count` cases of (kind, file name, bytes), spread over every suffix and kind."""
    for index in range(count):
        suffix = suffixes[index % len(suffixes)]
        kind = KINDS[(index // len(suffixes)) % len(KINDS)]
        own = samples.get(suffix)
        if kind == "random bytes":
            raw = rng.randbytes(rng.choice((0, 1, 8, 64, 512, 4096)))
            if rng.random() < 0.3:  # a real signature in front reaches deeper into decoders
                raw = rng.choice((b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x18ftypisom",
                                  b"\xef\xbb\xbf", b"{", b"[")) + raw
        elif kind == "wrong format" or own is None:
            others = [s for s in samples if s != suffix] or list(samples)
            raw = samples[rng.choice(others)]
        elif kind == "truncated":
            raw = own[:rng.randrange(len(own))]
        else:
            raw = mutate(rng, own)
        yield kind, f"fuzz-{index}{suffix}", raw


def fuzz_parsers(intake: Any, plugins: Any, count: int, seed: int,
                 folder: Path) -> dict[str, Any]:
    """Run `count` cases through `intake.resolver.parse`; the figures (crash examples included)."""
    from daemon.contract.jobfile import JobFileError

    samples = valid_samples(intake, plugins, folder)
    suffixes = sorted(plugins.job_parsers)
    outcome: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    crashes: list[str] = []
    caught: list[str] = []
    rng = random.Random(seed)
    for kind, name, raw in cases(rng, samples, suffixes, count):
        try:
            intake.resolver.parse(name, raw)
            result = "accepted"
        except JobFileError as exc:
            result = "rejected_with_report" if exc.what and exc.report().strip() else "no_report"
            if "job parser (plugin" in exc.what or "could not check this job" in exc.what:
                # A parser or check raised something else; the intake boundary reported it.
                outcome["caught_by_boundary"] += 1
                if len(caught) < 10:
                    caught.append(f"{kind} {name}: {exc.what}")
        except Exception as exc:  # a crash: counted and shown, never hidden
            result = "crashed"
            if len(crashes) < 10:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                crashes.append(f"{kind} {name} ({len(raw)} bytes): {type(exc).__name__}: "
                               f"{exc} at {Path(frame.filename).name}:{frame.lineno}")
        outcome[result] += 1
        by_kind[kind][result] += 1
    return {"tried": count, "suffixes": suffixes, "accepted": outcome["accepted"],
            "rejected_with_report": outcome["rejected_with_report"],
            "rejected_without_report": outcome["no_report"], "crashed": outcome["crashed"],
            "caught_by_boundary": outcome["caught_by_boundary"],
            "by_kind": {kind: dict(counts) for kind, counts in by_kind.items()},
            "crash_examples": crashes, "boundary_examples": caught}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(soak(args.cases, args.seed), indent=2))


def soak(count: int, seed: int) -> dict[str, Any]:
    """Build the tiny demo models in a temporary folder, start a daemon there (no renders)
    and fuzz its parsers."""
    from daemon.cli.demo import write_demo
    from daemon.config import config_from_dict
    from daemon.contract.loader import Plugins
    from daemon.runtime.console import quiet_libraries
    from daemon.runtime.runner import Daemon

    quiet_libraries()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plugins = Plugins()
        write_demo(root / "assets", plugins)
        config = config_from_dict({"paths": {"models": str(root / "assets" / "models")},
                                   "web": {"enabled": False}}, base=root / "intake")
        daemon = Daemon(config, plugins=plugins)
        daemon.start()
        try:
            fuzz_started = time.monotonic()
            figures = fuzz_parsers(daemon.intake, plugins, count, seed, root)
            figures["fuzz_seconds"] = round(time.monotonic() - fuzz_started, 1)
        finally:
            daemon.close()
    figures["seconds"] = round(time.monotonic() - started, 1)
    return figures


if __name__ == "__main__":
    main()
