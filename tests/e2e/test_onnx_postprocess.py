"""A user's story of ONNX post-processing: configure a chain of models in config.toml, drop a
job, and find upscaled PNGs that still carry their parameters, scores and tags in the history
(searchable from the command line), and a quality gate that flags or re-seeds weak renders.

The models are built here with onnx.helper: a nearest-neighbour 2x upscaler, a scorer that
reads the image mean, and a fixed-size tagger (which makes the plugin resize its input)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from sd_parsers import ParserManager
from sqlalchemy import select
from starlette.testclient import TestClient

from daemon.cli.main import build_parser
from daemon.config import ConfigError, PostprocessStep, config_from_dict
from daemon.store.models import Event, Store
from daemon.web.server import create_app
from plugins import onnx_postprocess
from tests.conftest import sdxl_job
from tests.support.helpers import query


def _save(graph: onnx.GraphProto, path: Path, labels: list[str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    if labels:
        helper.set_model_props(model, {"labels": json.dumps(labels)})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def upscaler(path: Path) -> Path:
    """image [1,3,H,W] -> [1,3,2H,2W], nearest neighbour."""
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    resize = helper.make_node("Resize", ["image", "", "scales"], ["upscaled"], mode="nearest")
    return _save(helper.make_graph(
        [resize], "upscale2x",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("upscaled", TensorProto.FLOAT, [1, 3, "H", "W"])],
        initializer=[scales]), path)


def scorer(path: Path, size: int | str = "h", constant: float | None = None,
           labels: list[str] | None = None) -> Path:
    """image -> [mean, 1 - mean] (plus a constant when given): bright and dark scores."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Sub", ["one", "mean"], ["inverse"])]
    parts, initializers = ["mean", "inverse"], [one]
    if constant is not None:
        initializers.append(helper.make_tensor("constant", TensorProto.FLOAT, [1], [constant]))
        parts.append("constant")
    nodes.append(helper.make_node("Concat", parts, ["scores"], axis=0))
    width = size if isinstance(size, int) else "w"
    return _save(helper.make_graph(
        nodes, "mean_scorer",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [len(parts)])],
        initializer=initializers), path, labels)


def run_with_chain(farm: Any, steps: list[dict[str, Any]]) -> int:
    """Run the farm's daemon with a [[postprocess]] chain, parsed the way config.toml is."""
    chain = config_from_dict({"postprocess": steps}, base=farm.root).postprocess
    config = replace(farm.config, postprocess=chain)
    from daemon.runtime.runner import Daemon

    return Daemon(config, plugins=farm.plugins).run(until_idle=True)


def cli_history(farm: Any, capsys: Any, *args: str) -> list[dict[str, Any]]:
    """`lorafarm history --json ARGS`, parsed and run in this process: a subprocess per query
    would spend seconds importing torch each time."""
    return json.loads(cli_text(farm, capsys, "--json", *args))


def cli_text(farm: Any, capsys: Any, *args: str) -> str:
    capsys.readouterr()
    parsed = build_parser().parse_args(
        ["history", "--config", str(farm.root / "config.toml"), *args])
    assert parsed.handler(parsed) == 0
    return str(capsys.readouterr().out)


def _renders(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for job in records for r in job["renders"]]


@pytest.fixture(autouse=True)
def _fresh_sessions() -> None:
    onnx_postprocess.clear_cache()  # every test builds its own model files


def test_upscaled_pngs_keep_their_parameters_and_scores_and_tags_are_searchable(
        farm, capsys) -> None:
    models = farm.root / "models" / "onnx"
    upscaler(models / "upscale.onnx")
    scorer(models / "mean.onnx")
    scorer(models / "tagger.onnx", size=8, constant=1.0, labels=["bright", "dark", "always"])
    farm.drop("harbour.toml", sdxl_job(prompt="a harbour at dusk", seed=11, count=2))
    started = time.perf_counter()
    assert run_with_chain(farm, [
        {"model": "models/onnx/upscale.onnx", "kind": "upscale"},
        {"model": "models/onnx/mean.onnx", "kind": "scores", "labels": ["brightness", "dark"]},
        {"model": "models/onnx/tagger.onnx", "kind": "tags", "threshold": 0.35},
    ]) == 0
    print(f"render + post-process of 2 images: {time.perf_counter() - started:.2f}s")

    pngs = sorted(farm.outputs.rglob("*.png"))
    assert len(pngs) == 2 and farm.files_in("done") == ["harbour.toml"]
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (128, 128)  # 64 px rendered, 2x upscaled, one file
            assert "Seed: " in image.text["parameters"]
        parsed = ParserManager().parse(png)
        assert parsed is not None and parsed.full_prompt == "a harbour at dusk"

    renders = _renders(cli_history(farm, capsys))
    assert len(renders) == 2
    for render in renders:
        bright = render["scores"]["brightness"]
        assert 0.0 < bright < 1.0
        assert render["scores"]["dark"] == pytest.approx(1.0 - bright, abs=1e-5)
        # The tagger saw the upscaled image resized to its fixed 8x8 input: about the same
        # mean, and "always" (a constant 1.0) is a tag of every render.
        assert render["tags"]["always"] == pytest.approx(1.0)
        assert ("bright" in render["tags"]) == (render["tags"].get("bright", 0) >= 0.35)
        assert not render["flagged"]
    assert bright != renders[0]["scores"]["brightness"], "two seeds, two images"

    assert len(_renders(cli_history(farm, capsys, "--tag", "always"))) == 2
    assert cli_history(farm, capsys, "--tag", "no-such-tag") == []
    low, high = sorted(r["scores"]["brightness"] for r in renders)
    middle = (low + high) / 2
    [kept] = _renders(cli_history(farm, capsys, "--min-score", f"brightness={middle}"))
    assert kept["scores"]["brightness"] == pytest.approx(high)
    assert len(_renders(cli_history(farm, capsys, "--min-score", str(min(low, 1 - high))))) == 2
    assert cli_history(farm, capsys, "--min-score", "brightness=2") == []
    text = cli_text(farm, capsys, "--tag", "always", "--min-score", "0")
    assert "brightness" in text and "always" in text and "harbour.toml" in text
    # The real command once, as a user types it (argparse rejects before torch is loaded).
    bad = farm.cli("history", "--min-score", "high")
    assert bad.returncode == 2 and "NAME=number" in bad.stderr


def test_the_quality_gate_flags_the_weaker_render(farm) -> None:
    scorer(farm.root / "models" / "mean.onnx")
    steps = [{"model": "models/mean.onnx", "kind": "scores", "labels": ["brightness", "dark"]}]
    farm.drop("probe.toml", sdxl_job(seed=21, count=2))
    assert run_with_chain(farm, steps) == 0
    values = sorted(r["scores"]["brightness"] for r in _renders(farm.history()))
    middle = (values[0] + values[1]) / 2

    farm.drop("gated.toml", sdxl_job(seed=21, count=2))  # the same two images again
    gate = {**steps[0], "min_score": middle, "gate": "flag"}
    assert run_with_chain(farm, [gate]) == 0
    gated = farm.history()[0]
    assert gated["file"] == "gated.toml" and gated["state"] == "done"
    flagged = [r for r in gated["renders"] if r["flagged"]]
    assert len(gated["renders"]) == 2 and len(flagged) == 1
    assert flagged[0]["scores"]["brightness"] == pytest.approx(values[0])
    assert not flagged[0]["reseeded"]
    # The job's page and its JSON show each render's scores and the verdict.
    app = create_app(farm.config, lambda: Store.for_path(farm.config.paths.database))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        detail = client.get(f"/api/jobs/{gated['id']}").json()
        page = client.get(f"/jobs/{gated['id']}").text
    by_seed = {r["seed"]: r for r in detail["renders"]}
    assert by_seed[flagged[0]["seed"]]["gate"] == "flagged"
    assert by_seed[flagged[0]["seed"]]["scores"]["brightness"] == pytest.approx(values[0],
                                                                               abs=1e-4)
    assert [r["gate"] for r in detail["renders"]].count(None) == 1
    assert "brightness <b>" in page and ">flagged</span>" in page


def test_reseed_queues_the_next_seed_once(farm) -> None:
    scorer(farm.root / "models" / "mean.onnx")
    farm.drop("never-good.toml", sdxl_job(seed=30, count=2))
    # Nothing reaches 2.0: both renders re-seed once, and the re-seeds are only flagged.
    assert run_with_chain(farm, [{"model": "models/mean.onnx", "kind": "scores",
                                  "labels": ["brightness", "dark"], "min_score": 2.0,
                                  "gate": "reseed"}]) == 0
    [job] = farm.history()
    assert job["state"] == "done" and farm.files_in("done") == ["never-good.toml"]
    renders = sorted(job["renders"], key=lambda r: r["index"])
    assert [r["seed"] for r in renders] == [30, 31, 32, 33]
    assert all(r["state"] == "done" and r["flagged"] for r in renders)
    assert [r["reseeded"] for r in renders] == [True, True, False, False]
    originals = {r["index"]: r for r in renders[:2]}
    assert all(r["reseed_of"] is not None for r in renders[2:])
    assert all(r["reseed_of"] is None for r in originals.values())
    assert len(list(farm.outputs.rglob("*.png"))) == 4


def test_a_missing_model_costs_the_extras_not_the_render(farm) -> None:
    farm.drop("plain.toml", sdxl_job(count=1))
    assert run_with_chain(farm, [{"model": "models/absent.onnx", "kind": "upscale"}]) == 0
    [png] = farm.outputs.rglob("*.png")
    with Image.open(png) as image:
        assert image.size == (64, 64)
    [job] = farm.history()
    assert job["state"] == "done" and job["renders"][0]["scores"] == {}
    # Said once at start as well, not only in each image's event.
    starts = query(farm.config, select(Event.message).where(
        Event.kind == "postprocess_model_missing"))
    assert len(starts) == 1 and "absent.onnx" in starts[0] and "config.toml" in starts[0]


@pytest.mark.parametrize(("table", "message"), [
    ({"model": "m.onnx", "kind": "upscale", "treshold": 0.5}, "did you mean postprocess[1]"),
    ({"model": "m.onnx", "kind": "upscaler"}, "use one of upscale, scores, tags"),
    ({"model": "m.onnx", "kind": "scores", "gate": "retry"}, "use one of flag, reseed"),
    ({"model": "m.onnx", "kind": "upscale", "min_score": 0.5}, 'kind = "scores" steps only'),
    ({"model": "m.onnx", "kind": "scores", "labels": ["a"], "gate_on": "b"}, "gate_on = 'b'"),
])
def test_a_bad_postprocess_table_says_what_and_where(tmp_path: Path, table: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(ConfigError, match="postprocess") as caught:
        config_from_dict({"postprocess": [table]}, base=tmp_path)
    assert message in str(caught.value)


def test_the_chain_parses_in_order_with_paths_relative_to_the_config(tmp_path: Path) -> None:
    config = config_from_dict({"postprocess": [
        {"model": "a.onnx", "kind": "upscale"},
        {"model": "b.onnx", "kind": "scores", "min_score": 1, "gate": "reseed"}]},
        base=tmp_path)
    assert config.postprocess == (
        PostprocessStep(model=tmp_path / "a.onnx", kind="upscale"),
        PostprocessStep(model=tmp_path / "b.onnx", kind="scores", min_score=1.0,
                        gate="reseed"))
