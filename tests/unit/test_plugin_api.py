"""The public plugin API (daemon.plugin_api) is the one door between plugins and the core.

Built-in families and plugins are the examples a plugin author copies, so they must import
only what a third-party plugin can rely on: these tests read their source (stdlib ast) and
fail on any import of another `daemon` module. They also check the kinder parts of the
contract: an optional demo, the sampler helper, the checkpoint path names, and the warning
for A1111 weighting a family cannot read.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from diffusers import EulerDiscreteScheduler

import daemon.plugin_api as api
from daemon.cli.demo import write_demo
from daemon.contract.loader import Plugins
from tests.conftest import REPO

PLUGIN_FOLDERS = ("families", "plugins", "examples")


def _daemon_imports(path: Path) -> list[str]:
    """`daemon` modules a source file imports other than the plugin API, as "line: module"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        modules: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        for module in modules:
            if module.split(".")[0] == "daemon" and module != "daemon.plugin_api":
                found.append(f"{node.lineno}: {module}")
    return found


def test_families_and_plugins_import_only_the_plugin_api() -> None:
    sources = [path for folder in PLUGIN_FOLDERS for path in (REPO / folder).rglob("*.py")]
    assert len([p for p in sources if "families" in p.parts]) >= 7
    offenders = {str(path.relative_to(REPO)): bad for path in sources
                 if (bad := _daemon_imports(path))}
    assert offenders == {}, ("plugins must import from daemon.plugin_api only: "
                             f"{offenders}")


def test_the_boundary_check_catches_a_core_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("import daemon.store.models\n\ndef f():\n"
                      "    from daemon.contract.samplers import make_scheduler\n"
                      "    from daemon.plugin_api import Family\n")
    assert _daemon_imports(sneaky) == ["1: daemon.store.models", "4: daemon.contract.samplers"]


def test_everything_in_all_exists() -> None:
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert missing == []
    for needed in ("Family", "CheckpointSource", "CheckpointProbe", "LoraProbe",
                   "LoadedCheckpoint", "FamilyDefaults", "RenderedVideo", "DemoAssets",
                   "RenderSpec", "LoraUse", "Progress", "RenderError", "BatchAborted",
                   "JobFileError", "hookimpl", "SafetensorsHeader", "LoraFacts",
                   "sampling_arguments", "encode_clip_prompts", "tiny_clip_tokenizer"):
        assert needed in api.__all__


class _NoDemoFamily(api.Family):
    """The least a family must write: a probe, a loader and a renderer."""

    name = "no-demo"
    architecture = "no-demo"
    display_name = "No Demo"
    defaults = api.FamilyDefaults(width=64, height=64, steps=4, cfg=5.0, sampler="Euler",
                                  schedule=None)

    def probe_checkpoint(self, source: api.CheckpointSource) -> api.CheckpointProbe | None:
        return None

    def load_pipeline(self, checkpoint, device, dtype):  # type: ignore[no-untyped-def]
        raise api.RenderError("never loaded here")

    def render_batch(self, pipe, specs, device, progress=None):  # type: ignore[no-untyped-def]
        return []


@api.hookimpl
def register_families(register) -> None:  # type: ignore[no-untyped-def]
    register(_NoDemoFamily())


def test_a_family_without_build_demo_is_skipped_by_the_demo(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugins = Plugins([__name__], entry_points=False)
    assert list(plugins.families) == ["no-demo"]
    with caplog.at_level(logging.INFO, logger="daemon.cli.demo"):
        config = write_demo(tmp_path, plugins)
    assert config.is_file()
    assert "No Demo family has no demo checkpoints" in caplog.text
    assert list((tmp_path / "jobs").iterdir()) == []


def test_a_family_that_cannot_read_a1111_weights_warns() -> None:
    family = _NoDemoFamily()
    _, _, notes = family.apply_conventions("a (red:1.3) barn BREAK fields", None, True)
    assert notes == ["prompt: No Demo does not read A1111 weighting or BREAK; they reach its "
                     "text encoder as written, brackets and numbers included"]
    assert family.apply_conventions("a red barn", None, True)[2] == []


def test_sampling_arguments_build_the_jobs_sampler_on_the_loaded_settings() -> None:
    class Pipe:
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, timestep_spacing="leading",
                                           steps_offset=1)

    pipe = Pipe()
    specs = [api.RenderSpec(family="x", checkpoint="c", prompt="p", negative_prompt="",
                            seed=seed, steps=6, cfg=5.0, sampler="DPM++ 2M", schedule="Karras",
                            width=64, height=64) for seed in (3, 4)]
    arguments = api.sampling_arguments(pipe, specs, None)
    first = pipe.scheduler
    assert type(first).__name__ == "DPMSolverMultistepScheduler"
    assert first.config.use_karras_sigmas and first.config.beta_end == 0.012
    assert arguments["num_inference_steps"] == 6 and arguments["callback_on_step_end"] is None
    assert [g.initial_seed() for g in arguments["generator"]] == [3, 4]
    # A second batch starts from the checkpoint's settings, not from the first sampler's.
    euler = [api.RenderSpec(**{**specs[0].__dict__, "sampler": "Euler a", "schedule": None})]
    api.sampling_arguments(pipe, euler, None)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert not pipe.scheduler.config.get("use_karras_sigmas")
    assert pipe.scheduler.config.timestep_spacing == "leading"


def test_loaded_checkpoint_says_where_weights_and_configs_come_from(tmp_path: Path) -> None:
    folder = api.LoadedCheckpoint(name="f", path=tmp_path / "f", kind="folder",
                                  config_path=None)
    assert (folder.folder, folder.weights_file, folder.config_folder) == (
        tmp_path / "f", None, tmp_path / "f")
    single = api.LoadedCheckpoint(name="s", path=tmp_path / "s.safetensors",
                                  kind="single_file", config_path=tmp_path / "cfg")
    assert (single.folder, single.weights_file, single.config_folder) == (
        None, tmp_path / "s.safetensors", tmp_path / "cfg")


def _families_graph() -> dict[str, set[str]]:
    """Module -> the `families` modules it imports anywhere (lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "families").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {node.module for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.level == 0
                         and (node.module or "").startswith("families.")}
    return graph


def test_no_import_cycles_in_families_and_builders_never_import_their_family() -> None:
    graph = _families_graph()
    family_modules = {m for m in graph if "register_families" in
                      (REPO / (m.replace(".", "/") + ".py")).read_text(encoding="utf-8")}
    assert len(family_modules) >= 7
    builders = {m for m in graph if m.rsplit(".", 1)[-1].startswith("tiny")
                or m.endswith("_tiny")}
    assert {m for m in builders if graph[m] & family_modules} == set()

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            module, trail = stack.pop()
            for imported in graph.get(module, ()):
                if imported == start:
                    return [*trail, start]
                if imported not in trail:
                    stack.append((imported, [*trail, imported]))
        return None

    cycles = [cycle for module in sorted(graph) if (cycle := cycle_from(module))]
    assert cycles == []
