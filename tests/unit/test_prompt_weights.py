"""A1111 prompt weights: read as A1111 reads them, applied on SDXL through compel, stripped
where nothing can weight them; prompts without weights render exactly as before."""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.contract.prompt_weights import (
    parse_prompt,
    strip_weights,
    to_compel_conjunction,
    to_compel_syntax,
)
from daemon.contract.samplers import make_scheduler
from daemon.contract.spec import RenderSpec
from families.sdxl.sdxl import SDXLFamily, encode_weighted_sdxl
from tests.conftest import sdxl_job


def runs(prompt: str) -> list[list[tuple[str, float]]]:
    return [[(run.text, round(run.weight, 6)) for run in chunk]
            for chunk in parse_prompt(prompt).chunks]


# -- reading A1111 syntax -----------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "expected"), [
    ("normal text", [[("normal text", 1.0)]]),
    ("", [[("", 1.0)]]),
    ("an (important) word", [[("an ", 1.0), ("important", 1.1), (" word", 1.0)]]),
    ("a (red:1.5) ball", [[("a ", 1.0), ("red", 1.5), (" ball", 1.0)]]),
    ("a ( red : 1.5 ) ball", [[("a ", 1.0), (" red ", 1.5), (" ball", 1.0)]]),
    ("[quiet] word", [[("quiet", round(1 / 1.1, 6)), (" word", 1.0)]]),
    ("((twice))", [[("twice", 1.21)]]),
    ("((a:1.3))", [[("a", 1.43)]]),
    ("[[a]]", [[("a", round(1 / 1.21, 6))]]),
    ("(unnecessary)(parens)", [[("unnecessaryparens", 1.1)]]),
    ("(a (b:2) c)", [[("a ", 1.1), ("b", 2.2), (" c", 1.1)]]),
    ("(a:0.5)", [[("a", 0.5)]]),
    ("(style: anime)", [[("style: anime", 1.1)]]),
    ("ratio 16:9", [[("ratio 16:9", 1.0)]]),
    # escapes are literal characters, also inside emphasis
    ("\\(literal\\]", [[("(literal]", 1.0)]]),
    ("yor \\(spy x family\\)", [[("yor (spy x family)", 1.0)]]),
    ("(yor \\(spy x family\\):1.2)", [[("yor (spy x family)", 1.2)]]),
    ("back\\\\slash", [[("back\\slash", 1.0)]]),
    # booru tag lists with emphasis, <lora:...> tags already removed at intake
    ("1girl, solo, (long hair:1.2), [smile], , masterpiece",
     [[("1girl, solo, ", 1.0), ("long hair", 1.2), (", ", 1.0), ("smile", round(1 / 1.1, 6)),
       (", , masterpiece", 1.0)]]),
    ("score_9, score_8_up, (source_anime), rating_safe",
     [[("score_9, score_8_up, ", 1.0), ("source_anime", 1.1), (", rating_safe", 1.0)]]),
    # BREAK: a new chunk, weights carry across it
    ("a castle BREAK a dragon", [[("a castle", 1.0)], [("a dragon", 1.0)]]),
    ("(a BREAK b:1.2)", [[("a", 1.2)], [("b", 1.2)]]),
    ("BREAKFAST BREAK", [[("BREAKFAST", 1.0)], [("", 1.0)]]),
    # unbalanced brackets stay literal
    ("(unbalanced", [[("(unbalanced", 1.0)]]),
    ("a) b", [[("a) b", 1.0)]]),
    ("((a) b", [[("(", 1.0), ("a", 1.1), (" b", 1.0)]]),
    ("x :1.2) y", [[("x :1.2) y", 1.0)]]),
])
def test_a1111_syntax_is_read_into_weighted_runs(prompt: str, expected: Any) -> None:
    assert runs(prompt) == expected


def test_unbalanced_brackets_and_prompt_editing_are_reported() -> None:
    assert parse_prompt("(unbalanced").warnings
    assert "unbalanced" in parse_prompt("a) b").warnings[0]
    assert parse_prompt("(a:1.2) \\(ok\\)").warnings == ()
    assert any("prompt editing" in w for w in parse_prompt("[cat:dog:0.5]").warnings)
    assert any("prompt editing" in w for w in parse_prompt("[cat|dog]").warnings)
    assert any("negative" in w for w in parse_prompt("(a:-1)").warnings)


# A1111's `modules/prompt_parser.parse_prompt_attention`, transcribed as the reference.
_A1111_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)


def a1111_parse_prompt_attention(text: str) -> list[list[Any]]:
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _A1111_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            res.append([token, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    return res


def _merged(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for text, weight in pairs:
        if not text:
            continue
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, weight)
        else:
            out.append((text, weight))
    return out


def _random_balanced_prompt(rng: random.Random, depth: int = 0) -> str:
    words = ["cat", "red hat", "\\(tag\\)", ", ", "16:9", "blue sky", " "]
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if depth < 3 and kind < 0.2:
            parts.append(f"({_random_balanced_prompt(rng, depth + 1)})")
        elif depth < 3 and kind < 0.35:
            parts.append(f"[{_random_balanced_prompt(rng, depth + 1)}]")
        elif depth < 3 and kind < 0.5:
            weight = rng.choice(["1.3", "0.7", "2", ".5", " 1.25 "])
            parts.append(f"({_random_balanced_prompt(rng, depth + 1)}:{weight})")
        else:
            parts.append(rng.choice(words))
    return "".join(parts)


def test_weights_match_a1111s_own_rule_exactly() -> None:
    # A1111's doctest, with its unclosed bracket closed (unclosed ones are literal here).
    assert runs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)") == [[
        ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]]
    rng = random.Random(1111)
    for _ in range(300):
        prompt = _random_balanced_prompt(rng)
        ours = [(run.text, run.weight) for run in parse_prompt(prompt).chunks[0]]
        theirs = _merged([(str(t), float(w)) for t, w in a1111_parse_prompt_attention(prompt)])
        assert _merged(ours) == theirs, prompt


def test_a_prompt_without_syntax_is_kept_exactly() -> None:
    for prompt in ["a red lighthouse", "  two  spaces ,\ttab\n", "16:9, 50% off!", "ünïcode ✓"]:
        parsed = parse_prompt(prompt)
        assert not parsed.has_weights and "".join(parsed.plain_chunks) == prompt


@pytest.mark.parametrize(("prompt", "plain", "had"), [
    ("a red ball", "a red ball", False),
    ("a (red:1.3) ball, (at dusk)", "a red ball, at dusk", True),
    ("[faint] glow", "faint glow", True),
    ("castle BREAK dragon", "castle dragon", True),
    ("yor \\(spy x family\\)", "yor (spy x family)", False),
    ("(unbalanced", "(unbalanced", False),
    ("((a:1.2), b)", "a, b", True),
])
def test_strip_weights_for_families_that_cannot_weight(prompt: str, plain: str,
                                                       had: bool) -> None:
    assert strip_weights(prompt) == (plain, had)


def test_compel_receives_the_same_runs_and_break_chunks() -> None:
    from compel import Compel

    conjunction = to_compel_conjunction(parse_prompt("a (red:1.5) ball BREAK [blue] sky"))
    assert conjunction.weights == [1.0, 1.0]
    assert [[(f.text, round(f.weight, 4)) for f in p.children] for p in conjunction.prompts] == [
        [("a ", 1.0), ("red", 1.5), (" ball", 1.0)], [("blue", 0.9091), (" sky", 1.0)]]
    [joined] = to_compel_conjunction(parse_prompt("a (b:2) BREAK c"), keep_breaks=False).prompts
    assert [(f.text, f.weight) for f in joined.children] == [
        ("a ", 1.0), ("b", 2.0), (" ", 1.0), ("c", 1.0)]
    # The text translation parses back, in compel's own parser, to the same weights.
    for prompt, expected in [
        ("a (red:1.5) ball", [[("a", 1.0), ("red", 1.5), ("ball", 1.0)]]),
        ("((cat)), [dog]", [[("cat", 1.21), (",", 1.0), ("dog", 0.909091)]]),
        ("x \\(y\\) (z:0.5)", [[("x (y)", 1.0), ("z", 0.5)]]),
        ("a BREAK (b:1.2)", [[("a", 1.0)], [("b", 1.2)]]),
    ]:
        parsed_back = Compel.parse_prompt_string(to_compel_syntax(prompt))
        assert [[(f.text, round(f.weight, 6)) for f in p.children]
                for p in parsed_back.prompts] == expected, to_compel_syntax(prompt)


# -- SDXL through compel ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe() -> Any:
    from families.sdxl.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.lorafarm_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def test_a_weight_changes_the_sdxl_embedding(tiny_pipe: Any) -> None:
    plain, weighted, broken = (parse_prompt(p) for p in
                               ("a red ball", "a (red:1.5) ball", "a red ball BREAK at dusk"))
    blurry = parse_prompt("blurry")
    out = encode_weighted_sdxl(tiny_pipe, [plain, weighted, broken], [blurry] * 3)
    # BREAK adds a chunk; the batch is padded to the longest with empty chunks.
    assert out["prompt_embeds"].shape[:2] == (3, 154)
    assert out["negative_prompt_embeds"].shape == out["prompt_embeds"].shape
    assert not torch.allclose(out["prompt_embeds"][0], out["prompt_embeds"][1])
    # The pooled embedding is that of the plain text, as in A1111: weights leave it alone.
    assert torch.equal(out["pooled_prompt_embeds"][0], out["pooled_prompt_embeds"][1])
    # Unweighted text through compel is exactly diffusers' own SDXL encoding.
    embeds, negative, pooled, negative_pooled = tiny_pipe.encode_prompt(
        prompt=["a red ball"], negative_prompt=["blurry"], device=torch.device("cpu"),
        do_classifier_free_guidance=True)
    assert torch.equal(out["prompt_embeds"][:1, :77], embeds)
    assert torch.equal(out["negative_prompt_embeds"][:1, :77], negative)
    assert torch.equal(out["pooled_prompt_embeds"][:1], pooled)
    assert torch.equal(out["negative_pooled_prompt_embeds"][:1], negative_pooled)


def _spec(prompt: str, seed: int, negative: str = "blurry") -> RenderSpec:
    return RenderSpec(family="sdxl", checkpoint="tiny-sdxl", prompt=prompt,
                      negative_prompt=negative, seed=seed, steps=2, cfg=5.0,
                      sampler="DPM++ 2M", schedule="Karras", width=64, height=64)


def _render_as_before(pipe: Any, specs: list[RenderSpec]) -> list[Image.Image]:
    """SDXLFamily.render_batch as it was before prompt weighting: text straight to diffusers."""
    first = specs[0]
    pipe.scheduler = make_scheduler(pipe.lorafarm_scheduler_config, first.sampler,
                                    first.schedule, kind="eps")
    return list(pipe(prompt=[s.prompt for s in specs],
                     negative_prompt=[s.negative_prompt for s in specs],
                     num_inference_steps=first.steps, guidance_scale=first.cfg,
                     width=first.width, height=first.height,
                     generator=[torch.Generator("cpu").manual_seed(s.seed) for s in specs],
                     output_type="pil").images)


def test_a_prompt_without_weights_renders_bit_identically_to_before(tiny_pipe: Any) -> None:
    family = SDXLFamily()
    specs = [_spec("a red lighthouse", 3), _spec("a blue boat, 16:9", 4, negative="")]
    before = _render_as_before(tiny_pipe, specs)
    now = family.render_batch(tiny_pipe, specs, torch.device("cpu"))
    for a, b in zip(before, now, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # In a batch shared with a weighted prompt, the plain render is still the same image as
    # that render alone (its own pipeline call; a batch of 2 against a batch of 1 may differ
    # in the last bit on some CPUs, which the batch tests bound separately).
    alone = family.render_batch(tiny_pipe, [specs[0]], torch.device("cpu"))[0]
    mixed = family.render_batch(tiny_pipe, [_spec("a (red:1.5) lighthouse", 3), specs[0]],
                                torch.device("cpu"))
    assert np.array_equal(np.asarray(mixed[1]), np.asarray(alone))
    assert not np.array_equal(np.asarray(mixed[0]), np.asarray(alone))


def test_a_weighted_job_renders_differently_and_records_the_prompt_as_written(farm) -> None:
    farm.drop("plain.toml", sdxl_job(prompt="a red lighthouse", seed=9, count=1, steps=2))
    farm.drop("weighted.toml", sdxl_job(prompt="a (red:1.5) lighthouse, [fog]", seed=9,
                                        count=1, steps=2))
    assert farm.run() == 0
    pngs = {p.parent.name: p for p in farm.outputs.rglob("*.png")}
    plain = next(p for name, p in pngs.items() if "plain" in name)
    weighted = next(p for name, p in pngs.items() if "weighted" in name)
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(weighted)))
    with Image.open(weighted) as image:
        infotext = image.text["parameters"]
    assert infotext.splitlines()[0] == "a (red:1.5) lighthouse, [fog]"
    job = next(j for j in farm.history() if j["file"] == "weighted.toml")
    assert all(r["state"] == "done" for r in job["renders"])


def test_unbalanced_brackets_are_reported_at_intake_and_kept_in_the_prompt() -> None:
    family = SDXLFamily()
    prompt, negative, notes = family.apply_conventions("a (red lighthouse", "blurry)", True)
    assert (prompt, negative) == ("a (red lighthouse", "blurry)")
    assert len(notes) == 2 and notes[0].startswith("prompt: unbalanced")
    assert notes[1].startswith("negative_prompt: unbalanced")
