"""Wildcards: {a|b}, {2$$a|b|c} and __name__ files, drawn per seed or every combination."""

from __future__ import annotations

import pytest
from PIL import Image

from daemon.contract.jobfile import JobFileError
from daemon.output.files import read_spec
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from tests.support.helpers import job_text


def _job(prompt: str, seed: int, count: int) -> str:
    return job_text(checkpoint="tiny-sdxl", prompt=prompt, seed=seed, count=count, steps=1,
                    width=64, height=64)


@pytest.fixture(scope="module")
def wildcard_daemon(started_daemon):  # type: ignore[no-untyped-def]
    folder = started_daemon.config.paths.wildcards
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "colors.txt").write_text("# a comment line\nred\nblue\ngreen\n")
    # A wildcard file may name other wildcards: nested lists.
    (folder / "sub" / "animal.txt").write_text("__colors__ cat\nsmall __colors__ dog\n")
    (folder / "broken.txt").write_text("a __ghost__ here\n")
    return started_daemon


def _prompts(daemon, text: str) -> list[tuple[int, str, str]]:  # type: ignore[no-untyped-def]
    _, renders, _ = daemon.intake.resolver.parse("job.toml", text.encode())
    return [(r.seed, r.prompt, r.extra["prompt_template"]) for r in renders]


def test_a_random_draw_is_the_same_for_the_same_seed(wildcard_daemon) -> None:
    template = "a {big|tiny|round} __sub/animal__ with {2$$hat|scarf|bow}"
    job = _job(prompt=template, seed=40, count=6)
    first = _prompts(wildcard_daemon, job)
    assert first == _prompts(wildcard_daemon, job)  # a re-render draws the same prompts
    assert [seed for seed, _, _ in first] == list(range(40, 46))
    assert all(t == template for _, _, t in first)
    for _, prompt, _ in first:
        assert "{" not in prompt and "__" not in prompt
        # nested: the animal's colour comes from colors.txt
        assert any(color in prompt for color in ("red", "blue", "green"))
        assert prompt.count(",") == 1  # two of hat/scarf/bow
    assert len({prompt for _, prompt, _ in first}) > 1  # each seed draws its own
    # One render of the batch again, alone: its seed draws the same prompt.
    again = _prompts(wildcard_daemon, _job(prompt=template, seed=43, count=1))
    assert again[0][1] == first[3][1]


def test_combinatorial_renders_every_combination(wildcard_daemon) -> None:
    job = _job(prompt="a {big|tiny} __sub/animal__", seed=1, count=2) + \
        "combinatorial = true\n"
    prompts = _prompts(wildcard_daemon, job)
    # 2 sizes x (3 colours x 2 animal lines) = 12 prompts, each at 2 seeds.
    assert len(prompts) == 24
    assert len({p for _, p, _ in prompts}) == 12
    assert "a tiny small green dog" in {p for _, p, _ in prompts}
    assert {seed for seed, _, _ in prompts} == {1, 2}


def test_a_missing_wildcard_file_is_refused_with_its_name(wildcard_daemon) -> None:
    with pytest.raises(JobFileError) as missing:
        _prompts(wildcard_daemon, _job(prompt="a __sub/animals__ at night", seed=1,
                                             count=1))
    assert "__sub/animals__" in str(missing.value)
    assert "sub/animal" in missing.value.fix  # the known ones are listed
    with pytest.raises(JobFileError) as nested:
        _prompts(wildcard_daemon, _job(prompt="__broken__", seed=1, count=1))
    assert "__ghost__" in str(nested.value)
    with pytest.raises(JobFileError) as unclosed:
        _prompts(wildcard_daemon, _job(prompt="a {red|blue lighthouse", seed=1, count=1))
    assert "cannot be read" in str(unclosed.value) and "{red|blue|green}" in unclosed.value.fix


def test_lora_tags_are_read_after_expansion_and_the_infotext_has_the_prompt(farm) -> None:
    write_kohya_original(make_tiny_lora(seed=2), farm.config.paths.loras / "ink.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    folder = farm.config.paths.wildcards
    folder.mkdir(parents=True)
    (folder / "style.txt").write_text("<lora:ink:0.7> ink drawing\n")
    farm.drop("wild.toml", _job(prompt="a {red|blue} lighthouse, __style__", seed=3,
                                      count=2))
    assert farm.run() == 0
    [job] = farm.history()
    assert job["state"] == "done", job
    outputs = sorted(farm.outputs.rglob("0*.png"))
    assert len(outputs) == 2
    for path in outputs:
        spec = read_spec(path)
        assert spec.extra["prompt_template"] == "a {red|blue} lighthouse, __style__"
        assert [(lora.name, lora.strength) for lora in spec.loras] == [("ink", 0.7)]
        assert spec.prompt in ("a red lighthouse, ink drawing", "a blue lighthouse, ink drawing")
        with Image.open(path) as image:
            parameters = image.info["parameters"]
        assert parameters.startswith(spec.prompt.strip())
        assert "__style__" not in parameters.splitlines()[0]
        assert 'Template: "a {red|blue} lighthouse, __style__"' in parameters
