"""The A1111 infotext lorafarm writes reads back the same, in lorafarm and in other readers."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sd_parsers import ParserManager

from daemon.contract.spec import LoraUse, RenderSpec
from plugins.a1111_metadata import format_infotext, infotext_for, parse_infotext

# A1111's pair rule (modules/infotext_utils.py in stable-diffusion-webui), written out here
# on purpose rather than imported, so the check does not depend on the module under test.
A1111_RULE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_pairs(line: str) -> dict[str, str]:
    """The fields as A1111 itself reads them (modules/infotext_utils.py), unquoted."""
    pairs = {}
    for key, value in A1111_RULE.findall(line):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        pairs[key] = value
    return pairs


def make_spec(**changes) -> RenderSpec:
    values = dict(
        family="sdxl",
        checkpoint="ponyDiffusionV6XL",
        prompt="score_9, score_8_up, 1girl, (watercolor:1.2),\nstanding in the rain",
        negative_prompt="blurry, lowres\nbad hands",
        seed=123456789,
        steps=25,
        cfg=7.0,
        sampler="DPM++ 2M",
        schedule="Karras",
        width=832,
        height=1216,
        checkpoint_hash="67ab2fd8ec",
        clip_skip=2,
        loras=(
            LoraUse("watercolor", 0.8, autov2="0123456789", autov3="0a1b2c3d4e5f"),
            LoraUse(
                "ink_style",
                1.0,
                text_encoder_strength=0.5,
                autov2="abcdef0123",
                autov3="aaaabbbbcccc",
            ),
        ),
    )
    values.update(changes)
    return RenderSpec(**values)


# --- format / parse ----------------------------------------------------------------------


def test_round_trip_with_awkward_values_and_multiline_prompts():
    prompt = "masterpiece, best quality: 1girl\n  second line, with (weights:1.1)\n"
    negative = 'lowres, "bad" anatomy\nworst quality: 2'
    fields = [
        ("Steps", 30),
        ("Sampler", "Euler a"),
        ("CFG scale", 6.5),
        ("Seed", 42),
        ("Size", "1024x1024"),
        ("Comment", "a, b: c"),
        ("Quoted", 'say "hi"'),
        ("Multi line", "one\ntwo\r\nthree"),
        ("Backslash", "C:\\models\\x.safetensors"),
        ("Padded", "  spaces around  "),
        ("Japanese", "桜, 猫"),
        ("Flag", True),
        ("Left out", None),
        ("Version", "lorafarm"),
    ]
    text = format_infotext(prompt, negative, fields)
    parsed_prompt, parsed_negative, parsed = parse_infotext(text)
    assert parsed_prompt == prompt
    assert parsed_negative == negative
    assert parsed == {
        "Steps": "30",
        "Sampler": "Euler a",
        "CFG scale": "6.5",
        "Seed": "42",
        "Size": "1024x1024",
        "Comment": "a, b: c",
        "Quoted": 'say "hi"',
        "Multi line": "one\ntwo\r\nthree",
        "Backslash": "C:\\models\\x.safetensors",
        "Padded": "  spaces around  ",
        "Japanese": "桜, 猫",
        "Flag": "True",
        "Version": "lorafarm",
    }
    # A1111's own rule reads the same fields from the same line.
    assert a1111_pairs(text.split("\n")[-1]) == parsed


def test_last_line_starts_with_steps_even_when_given_later():
    text = format_infotext("a cat", "", [("Sampler", "Euler"), ("Seed", 1), ("Steps", 20)])
    assert text.split("\n")[-1] == "Steps: 20, Sampler: Euler, Seed: 1"
    assert "Negative prompt" not in text


def test_floats_are_written_like_a1111():
    text = format_infotext("", "", [("Steps", 4), ("CFG scale", 7.0), ("Denoise", 0.35)])
    assert text == "Steps: 4, CFG scale: 7, Denoise: 0.35"


def test_values_that_would_break_the_line_are_json_quoted():
    line = format_infotext("", "", [("Steps", 1), ("Aa", "x,y"), ("Bb", "k: v"), ("Cc", "n\nl")])
    assert line == 'Steps: 1, Aa: "x,y", Bb: "k: v", Cc: "n\\nl"'


def test_empty_prompt_with_negative():
    text = format_infotext("", "ugly", [("Steps", 1), ("Seed", 2), ("Size", "8x8")])
    assert text == "Negative prompt: ugly\nSteps: 1, Seed: 2, Size: 8x8"
    assert parse_infotext(text) == ("", "ugly", {"Steps": "1", "Seed": "2", "Size": "8x8"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([("Seed", 1)], "needs a Steps field"),
        ([("Steps", None), ("Seed", 1)], "needs a Steps field"),
        ([("Steps", 1), ("Seed", 1), ("Seed", 2)], "given twice"),
        ([("Steps", 1), ("Bad:key", 1)], "cannot be read back"),
        ([("Steps", 1), ("X", 1)], "cannot be read back"),
        ([("Steps", 1), ("Hashes", {"model": {"nested": "x"}})], "flat object"),
    ],
)
def test_fields_that_cannot_be_written_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        format_infotext("p", "", fields)


def test_a_line_with_fewer_than_three_pairs_is_prompt_as_in_a1111():
    assert parse_infotext("a cat\nstyle: watercolor") == ("a cat\nstyle: watercolor", "", {})


def test_reads_a1111_written_infotext():
    text = (
        "1girl, <lora:add_detail:0.6>\n"
        "Negative prompt: easynegative\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
        'Size: 512x768, Model hash: 6ce0161689, Model: v1-5, Lora hashes: "add_detail: '
        '7c6bad76eb54", Hashes: {"model": "6ce0161689", "lora:add_detail": "7c6bad76eb"}, '
        "Version: v1.10.1\n"
    )
    prompt, negative, fields = parse_infotext(text)
    assert prompt == "1girl, <lora:add_detail:0.6>"
    assert negative == "easynegative"
    assert fields["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert json.loads(fields["Hashes"]) == {"model": "6ce0161689", "lora:add_detail": "7c6bad76eb"}
    assert fields["Version"] == "v1.10.1"
    assert fields["Schedule type"] == "Karras"


field_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from([",", ":", '"', "\n", " x", "x ", '"x"', "{a}", "\\", "", 'a,b:c"d\ne']),
)
prompt_lines = st.text(max_size=20).filter(lambda line: not line.startswith("Negative prompt:"))


@settings(max_examples=150, deadline=None, database=None)  # no .hypothesis/ folder
@given(
    prompt=st.lists(prompt_lines, max_size=3).map("\n".join),
    negative=st.text(max_size=40),
    values=st.lists(field_values, min_size=3, max_size=3),
)
def test_round_trip_property(prompt, negative, values):
    fields = [("Steps", 20), ("Alpha", values[0]), ("Beta key", values[1]), ("Gamma/x", values[2])]
    parsed_prompt, parsed_negative, parsed = parse_infotext(
        format_infotext(prompt, negative, fields)
    )
    assert (parsed_prompt, parsed_negative) == (prompt, negative)
    assert parsed == {
        "Steps": "20",
        "Alpha": values[0],
        "Beta key": values[1],
        "Gamma/x": values[2],
    }


# --- infotext_for ------------------------------------------------------------------------


def test_infotext_for_puts_fields_in_a1111_order():
    text = infotext_for(make_spec(), family_fields=[("Distilled CFG Scale", 3.5)])
    *_, last = text.split("\n")
    keys = [key for key, _ in A1111_RULE.findall(last.split(", Hashes: ")[0])]
    assert keys == [
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Model hash",
        "Model",
        "Clip skip",
        "Distilled CFG Scale",
        "Lora hashes",
    ]
    assert last.startswith("Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, ")
    assert "Size: 832x1216, Model hash: 67ab2fd8ec, Model: ponyDiffusionV6XL, Clip skip: 2" in last
    assert last.endswith(", Version: lorafarm")


def test_lora_tags_are_appended_to_the_prompt():
    prompt, negative, _ = parse_infotext(infotext_for(make_spec()))
    assert prompt == (
        "score_9, score_8_up, 1girl, (watercolor:1.2),\nstanding in the rain"
        " <lora:watercolor:0.8> <lora:ink_style:0.5:1>"  # text encoder 0.5, UNet 1
    )
    assert negative == "blurry, lowres\nbad hands"


def test_a_tag_already_in_the_prompt_is_not_written_twice():
    spec = make_spec(prompt="a cat <lora:watercolor:0.8>", loras=make_spec().loras[:1])
    prompt, _, _ = parse_infotext(infotext_for(spec))
    assert prompt == "a cat <lora:watercolor:0.8>"


def test_lora_hashes_read_with_a1111s_own_rule():
    last = infotext_for(make_spec()).split("\n")[-1]
    assert 'Lora hashes: "watercolor: 0a1b2c3d4e5f, ink_style: aaaabbbbcccc"' in last
    lora_hashes = a1111_pairs(last)["Lora hashes"]
    # A1111's Lora extension splits the value at commas, then at the colon.
    pairs = dict(item.split(":") for item in lora_hashes.split(","))
    assert {k.strip(): v.strip() for k, v in pairs.items()} == {
        "watercolor": "0a1b2c3d4e5f",
        "ink_style": "aaaabbbbcccc",
    }


def test_civitai_hashes_are_a_bare_json_object():
    last = infotext_for(make_spec()).split("\n")[-1]
    # Civitai's reader: the object after "Hashes:" up to the first closing brace.
    found = re.search(r"Hashes:\s*(\{[^}]*\})", last.replace("Lora hashes", ""))
    assert found is not None
    assert json.loads(found.group(1)) == {
        "model": "67ab2fd8ec",
        "lora:watercolor": "0123456789",
        "lora:ink_style": "abcdef0123",
    }
    assert json.loads(parse_infotext(infotext_for(make_spec()))[2]["Hashes"]) == json.loads(
        found.group(1)
    )


def test_optional_fields_are_left_out():
    spec = make_spec(schedule=None, clip_skip=None, checkpoint_hash=None, loras=())
    _, _, fields = parse_infotext(infotext_for(spec, version="lorafarm 0.1.0"))
    assert list(fields) == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Version"]
    assert fields["Version"] == "lorafarm 0.1.0"


def test_lora_names_are_made_safe_for_the_format():
    spec = make_spec(loras=(LoraUse("odd:name,{x}", 0.7, autov2="0123456789", autov3="abc"),))
    text = infotext_for(spec)
    assert "<lora:oddnamex:0.7>" in text
    assert '"oddnamex: abc"' in text
    assert '"lora:oddnamex":"0123456789"' in text


# --- PNG, read back by an independent reader ---------------------------------------------


def write_png(path, infotext: str) -> None:
    """What an output writer does: tEXt when the text is Latin-1, else iTXt (UTF-8)."""
    info = PngInfo()
    try:
        infotext.encode("latin-1")
    except UnicodeEncodeError:
        info.add_itxt("parameters", infotext)
    else:
        info.add_text("parameters", infotext)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


@pytest.mark.parametrize(
    ("prompt", "negative", "chunk"),
    [
        ("score_9, 1girl, watercolor,\nrain", "blurry, lowres\nbad hands", b"tEXt"),
        ("桜の木の下の猫, 水彩画\n雨の日", "低品質, ぼやけた", b"iTXt"),
    ],
    ids=["latin1", "japanese"],
)
def test_png_parameters_read_back_by_sd_parsers(tmp_path, prompt, negative, chunk):
    spec = make_spec(prompt=prompt, negative_prompt=negative, cfg=6.5, sampler="DPM++ 2M SDE")
    path = tmp_path / "render.png"
    write_png(path, infotext_for(spec))
    assert chunk in path.read_bytes()

    expected_prompt = f"{prompt} <lora:watercolor:0.8> <lora:ink_style:0.5:1>"
    with Image.open(path) as image:
        ours = parse_infotext(image.text["parameters"])
    assert ours[:2] == (expected_prompt, negative)

    info = ParserManager().parse(path)
    assert info is not None
    assert info.full_prompt == expected_prompt
    assert info.full_negative_prompt == negative
    (sampler,) = info.samplers
    # sd-parsers keeps the A1111 name as written; the schedule comes separately.
    assert sampler.name == "DPM++ 2M SDE"
    assert sampler.parameters["scheduler"] == "Karras"
    assert sampler.parameters["steps"] == "25"  # values stay strings
    assert sampler.parameters["cfg_scale"] == "6.5"
    assert sampler.parameters["seed"] == "123456789"
    assert sampler.model is not None
    assert (sampler.model.name, sampler.model.hash) == ("ponyDiffusionV6XL", "67ab2fd8ec")
    assert info.metadata["Size"] == "832x1216"
    # sd-parsers finds Civitai's Hashes object too, but not the quoted "Lora hashes".
    assert info.metadata["Hashes"]["lora:watercolor"] == "0123456789"
    assert "Lora hashes" not in info.metadata


# --- the plugin hook ---------------------------------------------------------------------


class StubFamily:
    """Only what the hook asks of a family."""

    def infotext_fields(self, spec: RenderSpec) -> list[tuple[str, object]]:
        return [("Distilled CFG Scale", 3.5)]


def test_output_metadata_hook_writes_the_parameters_entry():
    import pluggy

    import daemon
    import plugins.a1111_metadata
    from daemon.contract import hookspecs

    manager = pluggy.PluginManager("lorafarm")
    manager.add_hookspecs(hookspecs)
    manager.register(plugins.a1111_metadata)  # checks the hook's signature against the spec
    (entries,) = manager.hook.output_metadata(spec=make_spec(), family=StubFamily())
    assert list(entries) == ["parameters"]
    _, _, fields = parse_infotext(entries["parameters"])
    assert fields["Distilled CFG Scale"] == "3.5"
    assert fields["Version"] == f"lorafarm {daemon.__version__}"
