"""Every registered job parser, handed random bytes, files in the wrong format, truncations
and mutations of valid files (a real lorafarm PNG and MP4 among them), through the real
intake: no crash, every case accepted or rejected with a report. A short, seeded round; the
soak is `python -m tests.support.parser_fuzz --cases 5000`."""

from __future__ import annotations

from pathlib import Path

from tests.support.parser_fuzz import KINDS, fuzz_parsers

CASES = 320  # every suffix gets every kind 20 times


def test_every_job_parser_survives_random_wrong_truncated_and_mutated_files(
        started_daemon, tmp_path: Path) -> None:
    plugins = started_daemon.plugins
    figures = fuzz_parsers(started_daemon.intake, plugins, CASES, seed=15, folder=tmp_path)
    print(figures)
    assert figures["crash_examples"] == [] and figures["crashed"] == 0
    assert figures["rejected_without_report"] == 0
    assert figures["suffixes"] == sorted(plugins.job_parsers)
    assert {".toml", ".json", ".png", ".mp4"} <= set(figures["suffixes"])
    assert figures["accepted"] + figures["rejected_with_report"] == CASES
    for kind in KINDS:
        assert figures["by_kind"][kind].get("rejected_with_report", 0) > 0, kind
    # Random bytes and files in another format are never taken for a job.
    assert figures["by_kind"]["random bytes"].get("accepted", 0) == 0
