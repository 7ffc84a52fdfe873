"""`lorafarm models` and `lorafarm loras` answer from the index the daemon keeps, without
loading torch or a family plugin; --scan (or an empty index) looks at the folders."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon.cli.main import cmd_loras, cmd_models
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from tests.conftest import REPO

HEAVY = ("torch", "diffusers", "transformers", "families", "daemon.contract.loader",
         "daemon.runtime.runner")


def _run(command: Any, config: Path, *, scan: bool = False, as_json: bool = True
         ) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert command(argparse.Namespace(config=config, json=as_json, scan=scan)) == 0
    return out.getvalue(), err.getvalue()


def _farm_with_an_index(make_farm, assets, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A farm of one checkpoint and two LoRAs whose daemon has started once (and so
    scanned both folders into the index)."""
    models, loras = tmp_path / "my-models", tmp_path / "my-loras"
    models.mkdir()
    shutil.copy(assets.models / "tiny-sdxl-single.safetensors", models)
    write_kohya_original(make_tiny_lora(seed=1), loras / "ink.safetensors")
    (loras / "ink.toml").write_text('lineage = "pony"\ntrigger_words = ["ink style"]\n')
    (loras / "old.ckpt").write_bytes(b"\x80\x04pickle")
    farm = make_farm(paths={"models": str(models), "loras": str(loras)},
                     intake={"settle_seconds": 0.0})
    daemon = farm.daemon()
    daemon.start()
    daemon.close()
    return farm, models, loras


def test_models_and_loras_read_the_index_without_plugins(make_farm, assets,
                                                         tmp_path: Path) -> None:
    farm, _, _ = _farm_with_an_index(make_farm, assets, tmp_path)
    config = str(farm.config.source)
    probe = ("import sys, contextlib, io, json\n"
             "from daemon.cli.main import main\n"
             "out = {}\n"
             "for verb in ('models', 'loras'):\n"
             "    for extra in ([], ['--json']):\n"
             "        text = io.StringIO()\n"
             "        with contextlib.redirect_stdout(text):\n"
             f"            assert main([verb, '--config', {config!r}, *extra]) == 0\n"
             "        out[verb + ' '.join(extra)] = text.getvalue()\n"
             f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
             "print(json.dumps({'heavy': heavy, 'out': out}))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, text=True,
                            capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["heavy"] == []
    assert "lorafarm models --scan" in result.stderr  # says where the table came from
    models = {row["name"]: row for row in json.loads(answer["out"]["models--json"])}
    assert models["tiny-sdxl-single"]["state"] == "ok"
    assert models["tiny-sdxl-single"]["family"] == "sdxl"
    loras = {row["name"]: row for row in json.loads(answer["out"]["loras--json"])}
    assert loras["ink"]["lineage"] == "pony" and loras["ink"]["triggers"] == ["ink style"]
    assert loras["old"]["state"] == "quarantined"
    # The tables keep their headers, and their columns line up.
    table = answer["out"]["models"].splitlines()
    assert table[0].split() == ["NAME", "FAMILY", "STATE", "HASH", "QUANTIZED", "FILE"]
    assert table[1].startswith("tiny-sdxl-single  sdxl    ok")
    table = answer["out"]["loras"].splitlines()
    assert table[0].split() == ["NAME", "FAMILY", "LINEAGE", "LAYOUT", "RANK", "AUTOV3", "STATE"]
    state = table[0].index("STATE")
    assert [line[state:] for line in table if line[:1] != " "][1:] == ["ok", "quarantined"]


def test_the_index_says_what_a_scan_says_and_scan_looks_again(make_farm, assets,
                                                              tmp_path: Path) -> None:
    farm, models, loras = _farm_with_an_index(make_farm, assets, tmp_path)
    config = farm.config.source
    # A scan waits for the hashes; the index then holds them, and answers the same.
    scanned, _ = _run(cmd_models, config, scan=True)
    indexed, note = _run(cmd_models, config)
    assert json.loads(indexed) == json.loads(scanned) and "--scan" not in note
    assert all(len(row["hash"]) == 10 for row in json.loads(indexed))
    assert json.loads(_run(cmd_loras, config)[0]) == json.loads(_run(cmd_loras, config,
                                                                      scan=True)[0])
    # A file added since the daemon's last scan: the index does not know it; --scan does,
    # and writes it into the index.
    shutil.copy(models / "tiny-sdxl-single.safetensors", models / "later.safetensors")
    write_kohya_original(make_tiny_lora(seed=2), loras / "wash.safetensors")
    assert "later" not in {row["name"] for row in json.loads(_run(cmd_models, config)[0])}
    assert "wash" not in {row["name"] for row in json.loads(_run(cmd_loras, config)[0])}
    assert "later" in {row["name"] for row in json.loads(_run(cmd_models, config, scan=True)[0])}
    assert "wash" in {row["name"] for row in json.loads(_run(cmd_loras, config, scan=True)[0])}
    assert "later" in {row["name"] for row in json.loads(_run(cmd_models, config)[0])}


def test_an_empty_index_is_scanned(make_farm, assets, tmp_path: Path) -> None:
    models = tmp_path / "my-models"
    models.mkdir()
    shutil.copy(assets.models / "tiny-sdxl-single.safetensors", models)
    farm = make_farm(paths={"models": str(models)})  # no daemon has run: no database
    rows = json.loads(_run(cmd_models, farm.config.source)[0])
    assert [row["name"] for row in rows] == ["tiny-sdxl-single"]
    assert rows[0]["state"] == "ok" and len(rows[0]["hash"]) == 10
    assert json.loads(_run(cmd_loras, farm.config.source)[0]) == []


def test_a_daemon_that_indexed_no_lora_answers_loras_without_a_scan(make_farm, assets,
                                                                  tmp_path: Path) -> None:
    models, loras = tmp_path / "my-models", tmp_path / "my-loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(assets.models / "tiny-sdxl-single.safetensors", models)
    farm = make_farm(paths={"models": str(models), "loras": str(loras)})
    daemon = farm.daemon()
    daemon.start()
    daemon.close()
    probe = ("import sys\n"
             "from daemon.cli.main import main\n"
             f"assert main(['loras', '--config', {str(farm.config.source)!r}]) == 0\n"
             f"print([m for m in {HEAVY!r} if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, text=True,
                            capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "no LoRAs in" in result.stdout and result.stdout.splitlines()[-1] == "[]"
    # A LoRA added since: --scan finds it (the index alone does not know it yet).
    write_kohya_original(make_tiny_lora(seed=3), loras / "late.safetensors")
    assert json.loads(_run(cmd_loras, farm.config.source)[0]) == []
    assert [row["name"] for row in json.loads(_run(cmd_loras, farm.config.source,
                                                    scan=True)[0])] == ["late"]
