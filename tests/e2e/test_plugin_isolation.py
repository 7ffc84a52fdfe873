"""One broken plugin package never stops the others: plugins installed through a real
distribution's entry points (a dist-info folder on sys.path, as pip writes it) that fail to
import, register a taken family name, leave an abstract method out or misspell a hook are
skipped or reported with one line naming the distribution and the entry point; everything
else loads and renders. `lorafarm plugins` and the status page list both."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from starlette.testclient import TestClient

from daemon.contract.loader import Plugins
from daemon.store.models import Store
from daemon.web.server import create_app
from tests.conftest import Farm, sdxl_job

SAMPLES = "tests.support.plugin_samples"
BROKEN = {"broken_import": f"{SAMPLES}.broken_import",
          "duplicate_family": f"{SAMPLES}.duplicate_family",
          "abstract_family": f"{SAMPLES}.abstract_family",
          "misspelled_hook": f"{SAMPLES}.misspelled_hook",
          "raising_probe": f"{SAMPLES}.raising_probe",
          "no_such_module": f"{SAMPLES}.no_such_module"}


def install_distribution(site: Path, name: str, version: str,
                         entry_points: dict[str, str]) -> None:
    """What `pip install` leaves for a package's metadata: NAME-VERSION.dist-info with
    METADATA and entry_points.txt."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                        f"Version: {version}\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text(
        "[lorafarm]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()),
        encoding="utf-8")


@pytest.fixture
def broken_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   caplog: pytest.LogCaptureFixture) -> Plugins:
    site = tmp_path / "site-packages"
    install_distribution(site, "lorafarm-broken-plugins", "0.3", BROKEN)
    monkeypatch.syspath_prepend(str(site))
    with caplog.at_level(logging.WARNING, logger="daemon.contract.loader"):
        return Plugins()


def test_broken_plugins_are_skipped_with_one_line_each_and_the_rest_loads(
        broken_plugins: Plugins, caplog: pytest.LogCaptureFixture) -> None:
    skipped = {p.name: p for p in broken_plugins.skipped}
    assert set(skipped) == {"broken_import", "duplicate_family", "abstract_family",
                            "no_such_module"}
    assert all(p.distribution == "lorafarm-broken-plugins" and p.version == "0.3"
               for p in skipped.values())
    assert "No module named 'lorafarm_missing_dependency'" in skipped["broken_import"].reason
    assert "(at broken_import.py:5)" in skipped["broken_import"].reason
    assert "No module named 'tests.support.plugin_samples.no_such_module'" in \
        skipped["no_such_module"].reason
    assert skipped["duplicate_family"].reason.startswith(
        "it registers a family named 'sdxl', which plugin 'sdxl' already registers")
    assert "abstract" in skipped["abstract_family"].reason
    assert "render_batch" in skipped["abstract_family"].reason
    # One log line per skipped plugin, naming the distribution and the entry point.
    records = caplog.get_records("setup")  # the fixture loaded the plugins
    lines = [r.getMessage() for r in records if r.getMessage().startswith("skipped")]
    assert len(lines) == 4
    assert any("distribution lorafarm-broken-plugins 0.3, entry point "
               "lorafarm:broken_import = tests.support.plugin_samples.broken_import" in line
               for line in lines)
    assert all("Traceback" not in line for line in lines)

    # The misspelled hook is reported with a did-you-mean; its plugin registers nothing.
    misspelled = next(p for p in broken_plugins.loaded if p.name == "misspelled_hook")
    assert misspelled.problems == ["hook `register_family` is not a lorafarm hook and is "
                                   "never called (did you mean `register_families`?)"]
    assert misspelled.families == []
    assert any("register_family" in r.getMessage() and "lorafarm-broken-plugins" in
               r.getMessage() for r in records)

    # Everything else is there: the built-in families, the parsers, the good probe family.
    assert {"sdxl", "pony", "illustrious", "flux-dev", "wan22", "raising-probe"} <= set(
        broken_plugins.families)
    assert "never-registered" not in broken_plugins.families
    assert broken_plugins.families["sdxl"].__class__.__module__ == "families.sdxl.sdxl"
    assert {".toml", ".json", ".png", ".mp4"} <= set(broken_plugins.job_parsers)


def test_a_farm_with_broken_plugins_installed_still_renders(
        tmp_path: Path, assets: Any, broken_plugins: Plugins) -> None:
    farm = Farm(tmp_path, assets, broken_plugins)
    farm.drop("job.toml", sdxl_job(count=1, steps=2))
    assert farm.run() == 0
    assert farm.files_in("done") == ["job.toml"]
    # The raising probe blamed no model: tiny-sdxl is still recognised by sdxl.
    assert farm.models()["tiny-sdxl"]["state"] == "ok"


def test_a_probe_that_raises_is_named_and_logged_once_per_file(
        tmp_path: Path, assets: Any, broken_plugins: Plugins,
        caplog: pytest.LogCaptureFixture) -> None:
    farm = Farm(tmp_path, assets, broken_plugins, private_models=True)
    save_file({"mystery.block.weight": torch.zeros(4, 4)},
              str(farm.config.paths.models / "mystery.safetensors"))
    farm.config.paths.loras.mkdir(parents=True, exist_ok=True)
    save_file({"lora_mystery.lora_down.weight": torch.zeros(2, 4),
               "lora_mystery.lora_up.weight": torch.zeros(4, 2)},
              str(farm.config.paths.loras / "mystery-lora.safetensors"))
    caplog.clear()
    daemon = farm.daemon()
    daemon.start()
    try:
        for _ in range(3):  # rescans
            daemon.registry.scan()
            daemon.library.scan()
        mystery = daemon.registry.known("mystery")
        loras = {info.name: info for info in daemon.library.scan()}
    finally:
        daemon.close()
    assert mystery is not None and mystery.state == "unrecognised"
    assert mystery.reason.startswith("family raising-probe's probe raised KeyError: "
                                     "'model.no_such_tensor' (at raising_probe.py:16) (a bug "
                                     "in that plugin, 'raising_probe'")
    assert "fix or replace" not in mystery.reason
    farm.drop("mystery.toml", sdxl_job(checkpoint="mystery", count=1))
    daemon = farm.daemon()
    daemon.start()
    daemon.close()
    report = farm.rejection("mystery.toml")
    assert "family raising-probe's probe raised KeyError" in report
    assert "How to fix: update or remove the plugin named above" in report
    lora = loras["mystery-lora"]
    assert lora.state != "ok"
    assert "family raising-probe's probe raised KeyError: 'lora.no_such_tensor'" in lora.reason
    tracebacks = [r for r in caplog.records if r.exc_info and "probing" in r.getMessage()]
    files = sorted(Path(r.getMessage().split(":")[0].removeprefix("probing ")).name
                   for r in tracebacks)
    # Once per file for this plugin (every model and LoRA the family was shown), not per scan.
    assert len(files) == len(set(files))
    assert "mystery.safetensors" in files and "mystery-lora.safetensors" in files


def test_lorafarm_plugins_lists_loaded_and_skipped(farm: Farm, broken_plugins: Plugins,
                                                   tmp_path: Path) -> None:
    from daemon.cli.plugins import cmd_plugins

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cmd_plugins(argparse.Namespace(config=farm.config.source, json=True))
    assert code == 1  # a plugin was skipped
    report = json.loads(out.getvalue())
    loaded = {p["name"]: p for p in report["loaded"]}
    assert loaded["sdxl"]["families"] == ["sdxl"]
    assert loaded["sdxl"]["distribution"] == "lorafarm"
    assert loaded["rerender"]["job_formats"] == [".png", ".mp4"]
    assert loaded["a1111_metadata"]["hooks"] == ["output_metadata"]
    assert loaded["raising_probe"]["module"] == f"{SAMPLES}.raising_probe"
    skipped = {p["name"]: p for p in report["skipped"]}
    assert set(skipped) == {"broken_import", "duplicate_family", "abstract_family",
                            "no_such_module"}
    assert skipped["broken_import"]["source"] == (
        "entry point lorafarm:broken_import = tests.support.plugin_samples.broken_import")

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        cmd_plugins(argparse.Namespace(config=farm.config.source, json=False))
    assert "skipped (4):" in text.getvalue()
    assert "lorafarm-broken-plugins 0.3" in text.getvalue()
    assert "problem: hook `register_family`" in text.getvalue()

    app = create_app(farm.config, lambda: Store.for_path(farm.config.paths.database),
                     plugins=broken_plugins)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/api/plugins").json() == broken_plugins.report()
        page = client.get("/plugins")
        assert page.status_code == 200
        assert 'id="skipped-abstract_family"' in page.text and "render_batch" in page.text
        assert 'id="plugin-sdxl"' in page.text
    app.state.farm.close()


def test_config_plugin_modules_that_fail_are_skipped_too(tmp_path: Path, assets: Any) -> None:
    plugins = Plugins([f"{SAMPLES}.broken_import", f"{SAMPLES}.wrong_output_family"])
    (skipped,) = plugins.skipped
    assert skipped.source == "config.toml `plugins`" and skipped.distribution is None
    assert "wrong-output" in plugins.families and "sdxl" in plugins.families
