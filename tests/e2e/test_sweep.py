"""Sweeps: a [sweep] table renders the cartesian product and writes a labelled grid."""

from __future__ import annotations

from PIL import Image

from daemon.output.files import read_spec
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from tests.support.helpers import read_store


def test_a_sweep_renders_the_product_and_a_labelled_grid(farm) -> None:
    write_kohya_original(make_tiny_lora(seed=2), farm.config.paths.loras / "ink.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    farm.drop("sweep.toml", """\
checkpoint = "tiny-sdxl"
prompt = "a red lighthouse"
seed = 5
steps = 2
width = 64
height = 64
sampler = "Euler"

[[loras]]
name = "ink"

[sweep]
cfg = [3.0, 7.0]
prompt_sr = ["red", "blue", "green"]
"lora:ink" = [0.0, 1.0]
""")
    assert farm.run() == 0
    [job] = farm.history()
    assert job["state"] == "done" and len(job["renders"]) == 2 * 3 * 2
    specs = [read_spec(p) for p in farm.outputs.rglob("0*.png")]
    combos = {(s.cfg, s.prompt, s.loras[0].strength) for s in specs}
    assert len(combos) == 12
    assert {s.prompt for s in specs} == {"a red lighthouse", "a blue lighthouse",
                                         "a green lighthouse"}
    [grid] = list(farm.outputs.rglob("grid.png"))
    with Image.open(grid) as image:
        # 2 columns (cfg) x 6 rows (3 prompts x 2 strengths) of 64 px cells plus labels.
        assert image.size == (160 + 2 * 64, 24 + 6 * 64)
    # Three axes: one page per value of the third, the first axis across, the second down.
    pages = sorted(grid.parent.glob("grid-page-*.png"))
    assert len(pages) == 2
    _check_grid_links(farm, job["id"], grid)


def _check_grid_links(farm, job_id: int, grid) -> None:  # type: ignore[no-untyped-def]
    """The status page (history and job page) and the morning report link the grid."""
    import datetime as dt

    from starlette.testclient import TestClient

    from daemon.output.report import write_morning_report
    from daemon.store.models import Store
    from daemon.web.server import create_app

    relative = grid.relative_to(farm.outputs).as_posix()
    app = create_app(farm.config, lambda: Store.for_path(farm.config.paths.database))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert f'/files/{relative}"' in client.get("/history").text
        assert f'/files/{relative}"' in client.get(f"/jobs/{job_id}").text
        assert client.get(f"/api/jobs/{job_id}").json()["grids"][0] == relative
        assert client.get(f"/files/{relative}").status_code == 200
    app.state.farm.close()
    store = Store.for_path(farm.config.paths.database)
    report = write_morning_report(farm.config, store, dt.datetime(2000, 1, 1))
    store.engine.dispose()
    assert f'href="{relative}"' in report.read_text()


def test_bad_sweeps_are_rejected_with_the_fix(farm) -> None:
    base = 'checkpoint = "tiny-sdxl"\nprompt = "a cat"\nwidth = 64\nheight = 64\n'
    farm.drop("axis.toml", base + "[sweep]\ncfgs = [1.0]\n")
    farm.drop("search.toml", base + '[sweep]\nprompt_sr = ["dog", "fox"]\n')
    farm.drop("big.toml", base + "[sweep]\nseed = [" + ", ".join(map(str, range(101))) + "]\n")
    farm.drop("lora.toml", base + '[sweep]\n"lora:ink" = [0.5]\n')
    assert farm.run() == 0

    assert "unknown sweep axis `cfgs`" in farm.rejection("axis.toml")
    assert "did you mean `cfg`" in farm.rejection("axis.toml")
    assert "searches for 'dog', which is not in the prompt" in farm.rejection("search.toml")
    assert "101 combinations; at most 100" in farm.rejection("big.toml")
    assert "names a LoRA the job does not list" in farm.rejection("lora.toml")


# -- sweeping LoRA files, checkpoints and whole prompts --------------------------------------

EPOCH_FILES = ["mystyle-000002", "mystyle-000004", "mystyle-000006", "mystyle-000008",
               "mystyle-000010", "mystyle"]  # kohya saves the last epoch without a suffix


def _write_epochs(farm) -> None:  # type: ignore[no-untyped-def]
    for number, name in enumerate(EPOCH_FILES):
        write_kohya_original(make_tiny_lora(seed=100 + number),
                             farm.config.paths.loras / f"{name}.safetensors",
                             metadata={"ss_sd_model_name": "sd_xl_base_1.0",
                                       "ss_epoch": str(2 * (number + 1))})


def _lora_loads(farm) -> int:  # type: ignore[no-untyped-def]
    from daemon.store.queries import stats

    with read_store(farm.config) as store:
        return int(stats(store)["lora_loads"])


def _check_epoch_sweep(farm, job_name: str, prompts: set[str]) -> None:  # type: ignore[no-untyped-def]
    [job] = [j for j in farm.history() if j["name"] == job_name]
    assert job["state"] == "done" and len(job["renders"]) == 7 * 2 * 2
    folder = next(farm.outputs.glob(f"{job_name}-*"))
    specs = sorted((read_spec(p) for p in folder.glob("0*.png")), key=lambda s: s.seed)
    combos = set()
    order: list[str] = []
    for path in sorted(folder.glob("0*.png")):
        spec = read_spec(path)
        label = spec.extra["sweep"]["lora"]
        if label not in order:
            order.append(label)
    for spec in specs:
        swept = [lora.name for lora in spec.loras]
        label = spec.extra["sweep"]["lora"]
        if swept:
            [name] = swept
            epoch = int(name.rsplit("-", 1)[1]) if "-" in name else None
            assert spec.extra.get("epoch") == epoch
            assert label == (f"{name} (epoch {epoch})" if epoch else name)
            assert spec.loras[0].strength == 0.8  # sweep.lora_strength
        else:
            assert label == "none" and "epoch" not in spec.extra
        combos.add((tuple(swept), spec.prompt, spec.seed))
    assert len(combos) == 28
    assert {s.prompt for s in specs} == prompts
    # Epoch order across the grid: the final file (no suffix) last, the baseline after it.
    assert order == [f"mystyle-0000{e:02d} (epoch {e})" for e in (2, 4, 6, 8, 10)] + [
        "mystyle", "none"]
    with Image.open(folder / "grid.png") as grid:
        assert grid.size[0] == 160 + 7 * 64  # seven LoRA columns
        assert grid.size[1] > 4 * 64  # two prompts x two seeds, under the labels
    pages = sorted(p.name for p in folder.glob("grid-page-*.png"))
    assert pages == ["grid-page-01.png", "grid-page-02.png"]  # one page per seed


def test_an_epoch_sweep_loads_each_lora_file_once_and_labels_the_grid(farm) -> None:
    _write_epochs(farm)
    farm.drop("epochs.toml", """\
checkpoint = "tiny-sdxl"
negative_prompt = "blurry"
steps = 2
cfg = 5.0
width = 64
height = 64
sampler = "Euler"

[sweep]
lora = ["mystyle*", "none"]
lora_strength = 0.8
prompt = ["a red lighthouse at dusk on a cliff", "a cat"]
seed = [1, 2]
""")
    (farm.config.paths.inputs).mkdir(parents=True, exist_ok=True)
    (farm.config.paths.inputs / "sample_prompts.txt").write_text("""\
# the prompts the trainer sampled with
a red lighthouse at dusk on a cliff --n blurry --w 64 --h 64 --s 2 --l 5

a cat --n blurry --w 64 --h 64 --s 2 --l 5 --d 99
""")
    farm.drop("kohya.toml", """\
checkpoint = "tiny-sdxl"
prompts_file = "sample_prompts.txt"
sampler = "Euler"

[sweep]
lora = ["mystyle*", "none"]
lora_strength = 0.8
seed = [1, 2]
""")
    assert farm.run() == 0
    prompts = {"a red lighthouse at dusk on a cliff", "a cat"}
    _check_epoch_sweep(farm, "epochs", prompts)
    _check_epoch_sweep(farm, "kohya", prompts)
    # Six files, 56 renders between the two jobs: each file was loaded once.
    assert _lora_loads(farm) == len(EPOCH_FILES)


def test_epoch_files_sort_naturally_with_the_final_file_last() -> None:
    from daemon.resolver.sweep import expand_lora_entries, natural_key

    names = ["style-10", "style", "style-9", "style-000100", "other-1"]
    assert sorted(names, key=natural_key) == ["other-1", "style-9", "style-10", "style-000100",
                                              "style"]
    assert expand_lora_entries(["style-*", "none", "style"], names, "") == [
        "style-9", "style-10", "style-000100", None, "style"]


SWEEP_BASE = """\
checkpoint = "tiny-sdxl"
steps = 1
width = 64
height = 64
"""


def _library_with_epochs(daemon) -> None:  # type: ignore[no-untyped-def]
    loras = daemon.config.paths.loras
    for number, name in enumerate(("mystyle-000001", "mystyle-000002")):
        path = loras / f"{name}.safetensors"
        if not path.exists():
            write_kohya_original(make_tiny_lora(seed=300 + number), path,
                                 metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    daemon.library.scan()


def test_a_checkpoint_axis_checks_each_checkpoint_and_its_loras(started_daemon) -> None:
    import pytest

    from daemon.contract.jobfile import JobFileError

    _library_with_epochs(started_daemon)
    job = SWEEP_BASE + '[sweep]\ncheckpoint = ["tiny-sdxl", "tiny-sdxl-single"]\n' \
        'prompt = ["a red lighthouse", "a cat"]\nlora = ["mystyle-*"]\n'
    _, renders, _ = started_daemon.intake.resolver.parse("ckpt.toml", job.encode())
    assert len(renders) == 2 * 2 * 2
    assert [(r.checkpoint, r.extra["sweep"]["checkpoint"]) for r in renders[:4:2]] == [
        ("tiny-sdxl", "tiny-sdxl"), ("tiny-sdxl", "tiny-sdxl")]
    assert {r.checkpoint for r in renders} == {"tiny-sdxl", "tiny-sdxl-single"}
    assert {r.extra["sweep"]["prompt"] for r in renders} == {"a red lighthouse", "a cat"}
    # Each checkpoint's renders carry the swept LoRA files, each checked against it.
    assert {(r.checkpoint, r.loras[0].name) for r in renders} == {
        (c, f"mystyle-00000{n}") for c in ("tiny-sdxl", "tiny-sdxl-single") for n in (1, 2)}
    # A Pony checkpoint in the list: the SDXL-lineage epoch files are refused on it.
    pony = SWEEP_BASE + '[sweep]\ncheckpoint = ["tiny-sdxl", "tiny-pony"]\n' \
        'prompt = ["a fox"]\nlora = ["mystyle-*"]\n'
    with pytest.raises(JobFileError) as refused:
        started_daemon.intake.resolver.parse("pony.toml", pony.encode())
    assert "mystyle-000001" in str(refused.value) and "tiny-pony" in str(refused.value)


def test_bad_file_and_prompt_axes_are_refused_with_the_place(started_daemon) -> None:
    import pytest

    from daemon.contract.jobfile import JobFileError

    _library_with_epochs(started_daemon)
    inputs = started_daemon.config.paths.inputs
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "bad_width.txt").write_text("# header\na cat --w 64\n\na dog --w wide --h 64\n")
    (inputs / "bad_option.txt").write_text("a cat --q 3\n")
    cases = {
        '[sweep]\nlora = ["mystlye-*"]\nprompt = ["a cat"]\n':
            "sweep.lora entry 'mystlye-*' matches no LoRA",
        'prompts_file = "bad_width.txt"\n': "bad_width.txt, line 4: --w 'wide'",
        'prompts_file = "bad_option.txt"\n': "line 1: unknown option --q",
        'prompts_file = "nothere.txt"\n': "is not in the inputs folder",
        'prompts_file = "../escape.txt"\n': "without `..`",
        'prompt = "a cat"\n': None,  # the control: accepted
        '': "required key `prompt` is missing",
        'prompts_file = "bad_option.txt"\n[sweep]\nprompt = ["a cat"]\n':
            "`prompts_file` and `sweep.prompt` both give the prompts",
        '[sweep]\nlora = ["mystyle-000001"]\n[[loras]]\nname = "mystyle-000001"\n'
        'strength = 1.0\n': "swept by sweep.lora and also listed in [[loras]]",
    }
    for extra, message in cases.items():
        text = SWEEP_BASE + ('prompt = "x"\n' if "prompt" not in extra and extra else "") + extra
        if message is None:
            started_daemon.intake.resolver.parse("ok.toml", text.encode())
            continue
        with pytest.raises(JobFileError) as refused:
            started_daemon.intake.resolver.parse("bad.toml", text.encode())
        assert message in str(refused.value), (extra, str(refused.value))
