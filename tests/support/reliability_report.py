"""Regenerate docs/RELIABILITY.md from a fresh run of the fault and bad-input suites:

    .venv/bin/python -m tests.support.reliability_report [--trials 20] [--fuzz 2000]
                                                 [--fuzz-parsers 4000]

(`make reliability` runs exactly this.) It builds the tiny demo models, runs the SIGKILL
harness (tests/support/fault_harness.py) for `--trials` kill-and-restart cycles, feeds `--fuzz`
randomly mutated job files through the real intake, hands every registered job parser
`--fuzz-parsers` random, wrong-format, truncated and mutated files of every suffix
(tests/support/parser_fuzz.py), and writes the figures into the doc.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.support.helpers import REPO  # noqa: E402

DOC = REPO / "docs" / "RELIABILITY.md"

VALID = ('checkpoint = "tiny-sdxl"\nprompt = "a lighthouse"\nseed = 3\ncount = 2\nsteps = 4\n'
         'cfg = 5.0\nsampler = "DPM++ 2M Karras"\nwidth = 64\nheight = 64\n')


def mutate(rng: random.Random, text: str) -> bytes:
    """One random corruption of a valid job file: the kinds of damage files really get."""
    raw = bytearray(text.encode())
    kind = rng.randrange(8)
    if kind == 0:  # truncated
        return bytes(raw[: rng.randrange(len(raw))])
    if kind == 1:  # random bytes flipped
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if kind == 2:  # a value replaced by something of another type or out of range
        lines = text.splitlines()
        index = rng.randrange(len(lines))
        key = lines[index].split("=")[0].strip()
        value = rng.choice(['"x"', "-1", "1e99", "true", "[1, 2]", "{}", '""', "99999999999",
                            "nan", '"../../etc/passwd"', '"/abs/path.png"'])
        lines[index] = f"{key} = {value}"
        return "\n".join(lines).encode()
    if kind == 3:  # an unknown or misspelt key
        return (text + rng.choice(["stpes = 3\n", "widht = 64\n", "foo = 1\n",
                                   'image = "../x.png"\n', "frames = 6\n"])).encode()
    if kind == 4:  # a required key dropped
        lines = [line for line in text.splitlines() if not line.startswith(
            rng.choice(["checkpoint", "prompt"]))]
        return "\n".join(lines).encode()
    if kind == 5:  # empty or whitespace
        return rng.choice([b"", b"   \n\n", b"\xef\xbb\xbf"])
    if kind == 6:  # non-UTF-8
        return text.encode("utf-16")
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))  # noise


def fuzz(daemon, count: int, seed: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
    from daemon.contract.jobfile import JobFileError

    rng = random.Random(seed)
    outcome = {"tried": 0, "accepted": 0, "rejected_with_report": 0, "crashed": 0}
    for _ in range(count):
        raw = mutate(rng, VALID)
        suffix = rng.choice([".toml", ".json"])
        outcome["tried"] += 1
        try:
            daemon.intake.resolver.parse(f"fuzz{suffix}", raw)
            outcome["accepted"] += 1
        except JobFileError as exc:
            outcome["rejected_with_report"] += 1 if exc.report() else 0
        except Exception:  # anything else would be a bug: it is counted, not hidden
            outcome["crashed"] += 1
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--fuzz", type=int, default=2000)
    parser.add_argument("--fuzz-parsers", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    from daemon.cli.demo import write_demo
    from daemon.config import config_from_dict
    from daemon.contract.loader import Plugins
    from daemon.runtime.console import quiet_libraries
    from daemon.runtime.runner import Daemon
    from tests.support.fault_harness import run_trials
    from tests.support.parser_fuzz import fuzz_parsers

    quiet_libraries()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo(root / "assets", Plugins())
        farm = root / "farm"
        farm.mkdir()
        kills = run_trials(farm, root / "assets" / "models", root / "assets" / "configs",
                           args.trials, seed=args.seed)
        intake_root = root / "intake"
        config = config_from_dict({"paths": {"models": str(root / "assets" / "models")},
                                   "web": {"enabled": False}}, base=intake_root)
        daemon = Daemon(config, plugins=Plugins())
        daemon.start()
        fuzzed = fuzz(daemon, args.fuzz, args.seed)
        parsers = fuzz_parsers(daemon.intake, daemon.plugins, args.fuzz_parsers, args.seed,
                               root)
        daemon.close()
    figures = {"kill_trials": asdict(kills), "fuzzed_job_files": fuzzed,
               "fuzzed_parsers": parsers,
               "seconds": round(time.monotonic() - started, 1),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"Python {platform.python_version()}"}
    DOC.write_text(render_doc(figures, args) + _restart_soak_section(), encoding="utf-8")
    print(json.dumps(figures, indent=2))
    print(f"written: {DOC}")


def _restart_soak_section() -> str:
    """The restart soak's figures (`python -m tests.support.restart_soak --doc` writes them; it
    takes too long for this run), kept as they are."""
    from tests.support.restart_soak import SECTION_END, SECTION_START

    text = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start < 0 or end < 0:
        return ""
    return "\n" + text[start:end + len(SECTION_END)] + "\n"


def render_doc(figures: dict, args: argparse.Namespace) -> str:
    kills = figures["kill_trials"]
    fuzzed = figures["fuzzed_job_files"]
    lost = kills["renders_lost"]
    trials = (f"{kills['trials']} ({kills['kills']} SIGKILLs at random moments, "
              f"{kills['runs_finished_alone']} runs finished before their kill)")
    problems = str(len(kills["problems"]))
    if kills["problems"]:
        problems += " (" + "; ".join(kills["problems"][:5]) + ")"
    outcomes = (f"{fuzzed['accepted']} / {fuzzed['rejected_with_report']} / "
                f"{fuzzed['crashed']}")
    parsers = figures["fuzzed_parsers"]
    parser_outcomes = (f"{parsers['accepted']} / {parsers['rejected_with_report']} / "
                       f"{parsers['crashed']}")
    return f"""\
# Reliability: what lorafarm promises, and the figures behind it

Regenerate this page with one command: `make reliability` (which runs
`python -m tests.support.reliability_report --trials {args.trials} --fuzz {args.fuzz}
--fuzz-parsers {args.fuzz_parsers}`). The figures
below are from the last such run ({figures['machine']}, {figures['seconds']} s).

## Promises

1. **A dropped job is never lost.** The daemon takes a file by renaming it into its hidden
   claim folder `jobs/.taking-<name>/`, writes its job row and one row per render, then moves
   the file to `jobs/processing/`. A crash between the rename and the rows leaves the file in
   the claim folder: a lone daemon (it holds the state lock) returns every claim folder's
   files to `jobs/` at start-up and before `--until-idle` leaves; a farm returns those of a
   lost owner (see docs/FARM.md). A file that cannot go back is reported (a
   `claim_not_returned` event and a log line), never left silently. A crash between the rows
   and the move is repaired at the next start (the file is moved on, or filed with its job
   if that has ended).
2. **A render whose process died is rendered again; only evidence counts against it; one
   that kills its process every time ends failed.** Each attempt holds a lease with a
   heartbeat (step callbacks). At start-up every render left `running` goes back to the queue
   and runs again alone (a batch of one), before the rest of the queue. A death uses up one
   of `worker.max_attempts` only when the render was running alone and had reached its
   pipeline call (the worker records step 0 just before it): batch-mates and renders caught
   while their model loaded are not blamed. At the cap the render fails with the reason in
   the history and in the job's error file. (Dying alone before its pipeline call
   10 x `worker.max_attempts` times ends it too: a model whose load kills the process.)
3. **An output is either complete and recorded, or absent.** Files are written to a hidden
   temporary name, flushed (`fsync`), renamed in, and the folder is flushed, before the
   render is recorded done. Start-up removes leftover temporaries and any output of a render
   not recorded done (it renders again under the same name), so no file is ever counted
   twice or half.
4. **The folders mirror the database.** A finished job's file is in `jobs/done/` or
   `jobs/failed/` (with `NAME.error.txt`), a rejected one in `jobs/rejected/` with its report.
5. **Bad input never stops the daemon.** Malformed, binary, non-UTF-8, huge or out-of-range
   job files, unknown checkpoints and LoRAs, LoRAs of the wrong family or lineage, truncated
   or pickled model files, paths leaving the allowed folders: each is refused with what, where
   and how to fix it, and the daemon goes on.
6. **Only safetensors are loaded.** `.ckpt`/`.pt`/`.bin` files are listed and quarantined,
   never unpickled; diffusers folders are loaded with `use_safetensors=True`. Plugins come
   only from installed entry points and modules named in config.toml. Nothing from a job file
   reaches a shell or `eval`; input images must resolve inside the configured inputs folders.
   Each job writes only into its own `outputs/<name>-<id>/` folder.
7. **One daemon per state folder, under one name.** An exclusive lock on
   `state/daemon.lock` stops a second daemon from rendering everything twice. Without
   `--name`, the daemon's name is the host name and a hash of the state folder's path, the
   same across restarts: the hosts table holds hosts, not restarts, and dead hosts leave it
   after `forget_hosts_after_seconds`.
8. **A plugin's bug costs only its own part.** A plugin that fails to import or register is
   skipped (one log line naming its distribution and entry point). A job parser that raises
   rejects that file with a report naming the plugin and its line; entries that cannot be
   read (folders, FIFOs, broken links) are reported once and left alone, so start-up succeeds
   whatever sits in `jobs/`. A family that raises or returns something else than one image or
   video per render fails those renders with the family and its file:line; a failing output
   write fails the render (never leaves it `running`); a metadata, post-processing or event
   hook that raises costs only its extra. `lorafarm plugins` lists what was skipped and why.

## Durability settings

SQLite runs in WAL mode with `synchronous=NORMAL`, `busy_timeout=30000` and
`foreign_keys=ON` on every connection; the daemon writes inside `BEGIN IMMEDIATE`. NORMAL
survives any process crash (what the harness below does); after a power loss the last
transactions before the loss may be rolled back, which the start-up repair handles like a
crash (renders run again, nothing is recorded done without its file, because outputs are
flushed before the database is). The database and `state/` are created user-only (0600 /
0700). `lorafarm backup DEST` copies the database with SQLite's online backup API while the
daemon runs. `docs/systemd/lorafarm.service` restarts the daemon on failure and gives the
first SIGTERM time to finish the running batch.

## Figures from the last run

| what | figure |
|---|---|
| kill-and-restart trials | {trials} |
| job files dropped during the trials | {kills['jobs_dropped']} |
| renders accepted / done exactly once | {kills['renders_expected']} / {kills['renders_done']} |
| **renders lost** | **{lost}** |
| duplicate or unrecorded outputs | {kills['duplicate_outputs']} |
| half-written outputs left | {kills['partial_outputs']} |
| job files in the wrong folder | {kills['misplaced_job_files']} |
| SQLite `integrity_check` | {kills['integrity']} |
| most attempts a render needed | {kills['max_attempts_seen']} |
| problems found | {problems} |
| mutated job files fed through intake | {fuzzed['tried']} |
| accepted / rejected with a report / crashed | {outcomes} |
| files of every parser's suffix ({', '.join(parsers['suffixes'])}): random bytes, another \
format, truncated, mutated (a real PNG and MP4 among them) | {parsers['tried']} |
| accepted / rejected with a report / crashed | {parser_outcomes} |
| of those, parser or check exceptions turned into reports by the intake boundary | \
{parsers['caught_by_boundary']} |

`make test` runs the same harness with a few trials
(`tests/farm/test_fault_injection.py`), a poison render that SIGKILLs its own process until the
attempt cap ends it, property-based fuzzing of job files with hypothesis
(`tests/e2e/test_bad_inputs.py`, 600 examples per run), a seeded round of the parser fuzzing
above (`tests/unit/test_parser_fuzz.py`, 320 files), the boundaries around plugin code one by one
(`tests/e2e/test_boundaries.py`, `tests/e2e/test_plugin_isolation.py`: a bad file of every suffix
and unreadable entries in jobs/ at start-up, a family returning the wrong type, a writer
exception, raising hooks and probes, broken plugin packages), and the bad-input cases one by one
(empty, binary, non-UTF-8, huge, over the limits, paths out of the inputs folder, a job file
removed mid-processing, a LoRA or checkpoint deleted while its job waits, a full disk while
writing, a long reader holding the database). A longer soak is one command:
`python -m tests.support.fault_harness --trials 200`; for the parsers,
`python -m tests.support.parser_fuzz --cases 20000`.
"""


if __name__ == "__main__":
    main()
