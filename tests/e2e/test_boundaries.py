"""Nothing a user drops or installs stops the night: bad files of every suffix, unreadable
entries in jobs/, families and hooks with bugs each cost only their own job, render or extra.

The plugins with bugs are real modules (tests/support/plugin_samples/), loaded as config.toml
`plugins = [...]` modules or through a test distribution's entry point."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daemon.contract.loader import Plugins
from tests.conftest import Farm, demo_checkpoint_overrides, sdxl_job
from tests.support.parser_fuzz import VALID_TOML
from tests.support.plugin_samples.sabotaged_family import SABOTAGED, SabotagedFamily

SAMPLES = "tests.support.plugin_samples"


def events(farm: Farm, kind: str) -> list[tuple[str, dict[str, Any]]]:
    with sqlite3.connect(farm.root / "state" / "lorafarm.sqlite") as db:
        return [(message, json.loads(data or "{}")) for message, data in db.execute(
            "SELECT message, data_json FROM events WHERE kind = ? ORDER BY id", (kind,))]


def renders(farm: Farm) -> list[tuple[str, str | None]]:
    with sqlite3.connect(farm.root / "state" / "lorafarm.sqlite") as db:
        return list(db.execute("SELECT state, error FROM renders ORDER BY id"))


def farm_with(tmp_path: Path, assets: Any, modules: list[str], **overrides: Any) -> Farm:
    return Farm(tmp_path, assets, Plugins([f"{SAMPLES}.{m}" for m in modules]), **overrides)


def sdxl_as(assets: Any, family: str) -> dict[str, dict[str, str]]:
    """config.toml [checkpoints."tiny-sdxl"] with its family set to `family`."""
    tables = demo_checkpoint_overrides(assets)
    return {"tiny-sdxl": {**tables.get("tiny-sdxl", {}), "family": family}}


# -- intake ----------------------------------------------------------------------------------


def test_the_daemon_starts_and_renders_with_a_bad_file_of_every_suffix_in_jobs(
        tmp_path: Path, assets: Any) -> None:
    farm = farm_with(tmp_path, assets, ["raising_parser"])
    rng = random.Random(15)
    farm.drop("good.toml", sdxl_job(count=1, steps=2))
    bad = {"toml-saved-as.png": sdxl_job().encode(), "toml-saved-as.mp4": sdxl_job().encode(),
           "random.png": rng.randbytes(300), "random.mp4": rng.randbytes(3000),
           "random.toml": rng.randbytes(200), "half.json": b'{"checkpoint": "tiny-',
           "json-saved-as.toml": json.dumps({"checkpoint": "tiny-sdxl"}).encode(),
           "job.yaml": b"model: tiny-sdxl\n",
           # Pillow raises ValueError (not a "cannot identify" error) on this TOML text.
           "issue-15.png": VALID_TOML.encode()}
    # PNG and MP4 signatures followed by garbage reach deeper into the decoders.
    bad["signature.png"] = b"\x89PNG\r\n\x1a\n" + rng.randbytes(200)
    bad["signature.mp4"] = b"\x00\x00\x00\x18ftypmp42" + rng.randbytes(500)
    assert set(farm.plugins.job_parsers) <= {Path(n).suffix for n in bad} | {".json"}
    for name, raw in bad.items():
        farm.drop(name, raw)
    jobs = farm.jobs
    (jobs / "a folder").mkdir()
    os.mkfifo(jobs / "pipe.toml")
    (jobs / "dangling.toml").symlink_to(jobs / "nowhere.toml")
    (jobs / "loop-a.toml").symlink_to(jobs / "loop-b.toml")
    (jobs / "loop-b.toml").symlink_to(jobs / "loop-a.toml")

    assert farm.run() == 0

    assert farm.files_in("done") == ["good.toml"]
    assert renders(farm) == [("done", None)]
    for name in bad:
        report = farm.rejection(name)
        assert "How to fix" in report, name
    yaml = farm.rejection("job.yaml")
    assert "the .yaml job parser (plugin 'tests.support.plugin_samples.raising_parser')" in yaml
    assert "KeyError" in yaml and "raising_parser.py:13" in yaml
    assert "rename it to toml-saved-as.toml" in farm.rejection("toml-saved-as.png")
    issue = farm.rejection("issue-15.png")
    assert "the .png job parser (plugin 'rerender') could not read this file: ValueError" in issue
    assert "(at rerender.py:" in issue and "rename it to issue-15.toml" in issue
    assert "rename it to toml-saved-as.toml" in farm.rejection("toml-saved-as.mp4")
    assert "rename it to json-saved-as.json" in farm.rejection("json-saved-as.toml")
    assert "rename" not in farm.rejection("signature.mp4")  # it is what its name says
    left = {"a folder", "pipe.toml", "dangling.toml", "loop-a.toml", "loop-b.toml"}
    assert left <= {p.name for p in jobs.iterdir()}
    reported = {data["file"]: data["reason"] for _, data in events(farm, "job_file_unreadable")}
    assert set(reported) == left
    assert "folder" in reported["a folder"] and "FIFO" in reported["pipe.toml"]
    assert "does not exist" in reported["dangling.toml"] and "loops" in reported["loop-a.toml"]

    # Reported once: a second start and several scans add no event and move nothing.
    daemon = farm.daemon()
    daemon.start()
    try:
        daemon.intake.scan()
        daemon.intake.scan()
    finally:
        daemon.close()
    assert len(events(farm, "job_file_unreadable")) == 2 * len(left)  # once per daemon life
    assert left <= {p.name for p in jobs.iterdir()}


def test_a_family_raising_while_intake_resolves_a_job_rejects_it_naming_the_family(
        tmp_path: Path, assets: Any) -> None:
    farm = farm_with(tmp_path, assets, ["raising_conventions"],
                     checkpoints=sdxl_as(assets, "raising-conventions"))
    farm.drop("job.toml", sdxl_job(count=1))
    daemon = farm.daemon()
    daemon.start()  # takes the file at start-up: the start must not fail
    daemon.close()
    report = farm.rejection("job.toml")
    assert ("family raising-conventions "
            "(plugin 'tests.support.plugin_samples.raising_conventions') "
            "raised while checking this job: KeyError: 'score_10' (at "
            "raising_conventions.py:21)") in report
    assert "How to fix: this is a bug in plugin" in report


def test_a_job_file_without_read_permission_is_reported_once_and_left(
        farm: Farm, monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite runs as root, for whom no mode bit denies reading: the refusal is simulated
    # at the one call that reads job files.
    path = farm.drop("locked.toml", sdxl_job(count=1))
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.toml":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    daemon = farm.daemon()
    daemon.start()
    try:
        for _ in range(3):
            daemon.intake.scan()
    finally:
        daemon.close()
    assert path.exists()
    (reported,) = events(farm, "job_file_unreadable")
    assert "permission denied" in reported[0]


# -- rendering -------------------------------------------------------------------------------


def test_a_family_returning_the_pipeline_output_fails_its_render_and_the_run_ends(
        tmp_path: Path, assets: Any) -> None:
    farm = farm_with(tmp_path, assets, ["wrong_output_family"],
                     checkpoints=sdxl_as(assets, "wrong-output"))
    farm.drop("job.toml", sdxl_job(count=2, steps=2))
    assert farm.run() == 0  # --until-idle ends
    states = renders(farm)
    assert [state for state, _ in states] == ["failed", "failed"]
    error = states[0][1] or ""
    assert error.startswith("family wrong-output returned StableDiffusionXLPipelineOutput")
    assert "PIL image or RenderedVideo" in error
    assert farm.files_in("failed") == ["job.toml", "job.toml.error.txt"]


def test_load_pipeline_raising_names_the_family_and_its_own_line(tmp_path: Path,
                                                                  assets: Any) -> None:
    farm = farm_with(tmp_path, assets, ["raising_loader"],
                     checkpoints=sdxl_as(assets, "raising-loader"))
    farm.drop("job.toml", sdxl_job(count=1, steps=2))
    assert farm.run() == 0
    ((state, error),) = renders(farm)
    assert state == "failed"
    assert error is not None
    assert error.startswith("family raising-loader "
                            "(plugin 'tests.support.plugin_samples.raising_loader')"
                            " raised while loading the pipeline: TypeError")
    assert error.endswith("(at raising_loader.py:21)")  # not <frozen genericpath>


def test_lora_patching_that_raises_fails_the_render_with_the_family_and_its_line(
        tmp_path: Path, assets: Any) -> None:
    from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original

    farm = farm_with(tmp_path, assets, ["raising_lora"],
                     checkpoints=sdxl_as(assets, "raising-lora"))
    farm.config.paths.loras.mkdir(parents=True, exist_ok=True)
    write_kohya_original(make_tiny_lora(seed=21, scale=2.0),
                         farm.config.paths.loras / "ink.safetensors")
    farm.drop("job.toml", sdxl_job(count=1, steps=2) + '\n[[loras]]\nname = "ink"\n')
    farm.drop("plain.toml", sdxl_job(count=1, steps=2, seed=8))
    assert farm.run() == 0
    with sqlite3.connect(farm.root / "state" / "lorafarm.sqlite") as db:
        rows = dict(db.execute("SELECT jobs.file_name, renders.error FROM renders "
                               "JOIN jobs ON jobs.id = renders.job_id"))
    assert rows["job.toml"] == (
        "family raising-lora (plugin 'tests.support.plugin_samples.raising_lora') raised while "
        "applying LoRAs: AttributeError: 'RaisingLoraFamily' object has no attribute "
        "'lora_prefix' (at raising_lora.py:19)")
    assert rows["plain.toml"] is None  # the same family without a LoRA renders
    assert farm.files_in("done") == ["plain.toml"]


def test_hooks_that_raise_cost_only_their_extras(tmp_path: Path, assets: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    farm = farm_with(tmp_path, assets, ["raising_hooks"])
    farm.drop("job.toml", sdxl_job(count=2, steps=2))
    assert farm.run() == 0
    # Each hook's traceback once, though it raised at every render and event.
    for hook in ("output_metadata", "post_process", "on_event"):
        logged = [r for r in caplog.records if r.exc_info and f"raised in `{hook}`" in
                  r.getMessage()]
        assert len(logged) == 1, hook
    assert [state for state, _ in renders(farm)] == ["done", "done"]
    outputs = sorted(farm.outputs.rglob("*.png"))
    assert len(outputs) == 2
    from PIL import Image

    with Image.open(outputs[0]) as image:
        assert "parameters" in image.text  # the other metadata plugin's entries are there
        assert "broken" not in image.text
    skipped = events(farm, "metadata_failed")
    assert len(skipped) == 2
    assert "plugin 'tests.support.plugin_samples.raising_hooks' raised in `output_metadata`" in \
        skipped[0][0]
    assert "raising_hooks.py:12" in skipped[0][0]
    assert len(events(farm, "postprocess_failed")) == 2
    assert farm.files_in("done") == ["job.toml"]


def test_a_writer_exception_fails_the_render_and_the_run_ends(tmp_path: Path,
                                                              assets: Any) -> None:
    farm = farm_with(tmp_path, assets, ["empty_image_family"],
                     checkpoints=sdxl_as(assets, "empty-image"))
    farm.drop("job.toml", sdxl_job(count=2, steps=2))
    assert farm.run() == 0  # --until-idle ends: no render stays `running`
    states = renders(farm)
    assert [state for state, _ in states] == ["failed", "failed"]
    assert (states[0][1] or "").startswith(
        "writing the output failed: ValueError: cannot write empty image (at ")
    assert farm.files_in("failed") == ["job.toml", "job.toml.error.txt"]
    assert not list(farm.outputs.rglob("*.png"))


def test_a_family_whose_memory_estimates_raise_still_renders_and_the_run_ends(
        tmp_path: Path, assets: Any, caplog: Any) -> None:
    """batch_cost and weights_cost run inside the scheduler's claim (with a memory budget):
    a family bug there must not fail every claim and leave the queue waiting for good."""
    farm = farm_with(tmp_path, assets, ["raising_costs"],
                     checkpoints=sdxl_as(assets, "raising-costs"),
                     worker={"max_batch": 4, "vram_budget_gb": 8.0})
    farm.drop("job.toml", sdxl_job(count=2, steps=2))
    assert farm.run() == 0  # --until-idle ends
    states = renders(farm)
    # The claim went ahead one render at a time; rendering then met the family's bug too
    # (its batch cost sizes the batch's memory reserve) and says so, naming the family.
    assert [state for state, _ in states] == ["failed", "failed"]
    assert all(error.startswith("family raising-costs "
                                "(plugin 'tests.support.plugin_samples.raising_costs')")
               and error.endswith("(at raising_costs.py:20)")
               for _, error in states)
    assert farm.files_in("failed") == ["job.toml", "job.toml.error.txt"]
    assert farm.files_in("processing") == []
    logged = [r.getMessage() for r in caplog.records if "memory estimate raised" in r.getMessage()]
    assert len(logged) == 1 and "family raising-costs" in logged[0]



def test_a_plugin_whose_every_hook_calls_sys_exit_costs_only_its_extras(
        tmp_path: Path, assets: Any) -> None:
    farm = farm_with(tmp_path, assets, ["exiting_plugin"])
    farm.drop("job.yml", b"model: tiny-sdxl\n")
    farm.drop("good.toml", sdxl_job(count=2, steps=2))
    assert farm.run() == 0  # --until-idle ends; no thread of the daemon died
    assert [state for state, _ in renders(farm)] == ["done", "done"]
    assert farm.files_in("done") == ["good.toml"]
    rejected = farm.rejection("job.yml")
    assert "the .yml job parser (plugin 'tests.support.plugin_samples.exiting_plugin')" in \
        rejected and "SystemExit" in rejected
    assert len(events(farm, "metadata_failed")) == 2
    assert len(events(farm, "postprocess_failed")) == 2

# -- the class: any exception from any family method --------------------------------------

@pytest.mark.parametrize("raised", [RuntimeError("sabotaged"), SystemExit(3)],
                         ids=["RuntimeError", "SystemExit"])
@pytest.mark.parametrize("method", SABOTAGED)
def test_whatever_a_family_method_raises_the_run_ends_with_every_job_filed(
        tmp_path: Path, assets: Any, monkeypatch: pytest.MonkeyPatch, method: str,
        raised: BaseException) -> None:
    """Whichever method the core calls raises (a plugin's sys.exit() included), the daemon
    keeps its threads, `--until-idle` ends, no render stays queued or running, the job file
    is filed, and what failed names the family."""
    monkeypatch.setattr(SabotagedFamily, "raising", {method: raised})
    farm = farm_with(tmp_path, assets, ["sabotaged_family"],
                     checkpoints=sdxl_as(assets, "sabotaged"),
                     worker={"max_batch": 2, "vram_budget_gb": 8.0, "max_attempts": 2})
    farm.drop("job.toml", sdxl_job(count=2, steps=2))
    assert farm.run() == 0
    states = renders(farm)
    assert all(state in ("done", "failed") for state, _ in states), states
    assert farm.files_in("processing") == []
    assert not [p for p in farm.jobs.glob("*/*") if p.parent.name.startswith(".taking-")]
    filed = {folder: farm.files_in(folder) for folder in ("done", "failed", "rejected")}
    assert sum("job.toml" in names for names in filed.values()) == 1, filed
    for folder in ("failed", "rejected"):
        if "job.toml" in filed[folder]:
            report = (farm.jobs / folder / "job.toml.error.txt").read_text()
            assert "sabotaged" in report, report
    assert all("sabotaged" in (error or "") for state, error in states if state == "failed")
