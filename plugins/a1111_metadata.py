"""A1111 "parameters" infotext: the text A1111, Forge, Civitai and image browsers read back.

Every output file carries its render spec as JSON for exact re-renders by lorafarm, but the
rest of the ecosystem reads AUTOMATIC1111's infotext, so that is written too::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>     (left out when empty)
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, ...

The last line must start with "Steps: " (Civitai requires it). Pairs are joined by ", "; a
value that would break the pair rule (a comma, colon, quote or line break) is JSON-quoted, as
A1111 does. Civitai's own extension appends ``Hashes: {...}`` as a bare JSON object, so a
mapping value is written that way here, and read back by the parser.

Readers differ: A1111 matches pairs with its regex (`A1111_PAIR_RE`); the PyPI `sd-parsers`
splits the last line at commas and colons, so it reads prompts, sampler, steps, CFG, seed,
size and model correctly but mangles quoted values such as "Lora hashes".

Known limit of the format itself: a prompt line that starts with "Negative prompt:" cannot
be told apart from the real negative prompt by any reader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from daemon.plugin_api import (
    LORAFARM_VERSION,
    LoraUse,
    RenderSpec,
    hookimpl,
)
from daemon.plugin_api import refinement_infotext_fields as refine_fields

if TYPE_CHECKING:
    from daemon.plugin_api import Family

# A1111's own pair rule (modules/infotext_utils.py), applied to the last line.
A1111_PAIR_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

# The same rule with one more alternative: a bare JSON object without nested braces, as in
# Civitai's "Hashes: {...}". A1111's rule would cut it at its first comma.
_PAIR_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|\{[^{}]*\}|[^,]*)(?:,|$)')

# Keys must be readable by A1111's key pattern: two or more word characters, spaces, hyphens
# or slashes, starting with a word character. A trailing space would become part of the key.
_KEY_RE = re.compile(r"\w[\w \-/]*[\w\-/]")

_NEGATIVE_PREFIX = "Negative prompt:"
_QUOTE_TRIGGERS = (",", ":", '"', "\n", "\r")

# Characters that would break a LoRA name inside `<lora:NAME:W>`, "Lora hashes" or the
# Hashes JSON. A1111 itself drops ":" and "," from names it writes into "Lora hashes".
_UNSAFE_NAME_CHARS = re.compile(r"[:,<>{}\r\n]")


def format_infotext(prompt: str, negative_prompt: str, fields: list[tuple[str, object]]) -> str:
    """The A1111 infotext for a prompt, a negative prompt and ordered (key, value) fields.

    Fields whose value is None are left out. "Steps" is moved first whatever its position,
    because Civitai only recognises a parameters line starting with "Steps: ". Floats are
    written as A1111 writes them (7.0 -> "7", 6.5 -> "6.5"); a mapping value is written as a
    compact JSON object (Civitai's "Hashes"). Raises ValueError for a missing Steps field, a
    repeated key, or a key A1111 could not read back.
    """
    pairs = _ordered_fields(fields)
    parameters = ", ".join(f"{key}: {_format_value(key, value)}" for key, value in pairs)
    lines = []
    if prompt:
        lines.append(prompt)
    if negative_prompt:
        lines.append(f"{_NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(parameters)
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) from an A1111 infotext; the inverse of format_infotext.

    Fields come from A1111's pair rule on the last line (a line with fewer than three pairs
    is not a parameters line, as in A1111); quoted values are unquoted with json.loads, and a
    bare JSON object (Civitai's "Hashes") is returned as its JSON text. Unlike A1111, which
    strips every prompt line, the prompt's own whitespace is kept so that a round trip through
    format_infotext is exact.
    """
    lines = text.rstrip().split("\n")
    matches = list(_PAIR_RE.finditer(lines[-1]))
    if len(matches) >= 3:
        body = lines[:-1]
        fields = {m.group(1).strip(): _unquote(m.group(2)) for m in matches}
    else:
        body = lines
        fields = {}
    prompt, negative_prompt = _split_prompt(body)
    return prompt, negative_prompt, fields


def infotext_for(
    spec: RenderSpec,
    family_fields: list[tuple[str, object]] | None = None,
    version: str = "lorafarm",
) -> str:
    """The infotext for one render, fields in A1111's order.

    `family_fields` are family-specific extras placed after the core fields, e.g. Forge's
    ("Distilled CFG Scale", 3.5) for Flux. LoRAs appear three ways, each for its reader:
    `<lora:NAME:W>` tags appended to the prompt (A1111 and Civitai take weights from there),
    "Lora hashes" with AutoV3 hashes (A1111's Lora extension), and "Hashes" with AutoV2
    hashes (Civitai's extension, which links the resources on upload).
    """
    fields: list[tuple[str, object]] = [
        ("Steps", spec.steps),
        ("Sampler", spec.sampler),
        ("Schedule type", spec.schedule),
        ("CFG scale", spec.cfg),
        ("Seed", spec.seed),
        ("Size", f"{spec.width}x{spec.height}"),
        ("Model hash", spec.checkpoint_hash),
        ("Model", spec.checkpoint),
        ("Clip skip", spec.clip_skip),
        *(family_fields or []),
        # sd-dynamic-prompts' fields: the wildcard template the prompt was drawn from.
        ("Template", spec.extra.get("prompt_template")),
        ("Negative Template", spec.extra.get("negative_prompt_template")),
        # Hires fix and image-to-image, whatever the family (daemon/contract/hires.py).
        *refine_fields(spec.extra, spec.sampler, spec.schedule, spec.prompt,
                       spec.negative_prompt),
    ]
    embeddings = spec.extra.get("embeddings") or []
    if embeddings:
        # A1111's textual-inversion record: "name: AutoV2, name2: AutoV2" (quoted).
        fields.append(("TI hashes", ", ".join(f"{_safe_name(e['name'])}: {e['autov2']}"
                                              for e in embeddings if e.get("autov2")) or None))
    if spec.loras or embeddings:
        if spec.loras:
            fields.append(("Lora hashes", _lora_hashes(spec.loras)))
        fields.append(("Hashes", _civitai_hashes(spec)))
    fields.append(("Version", version))
    prompt = _prompt_with_lora_tags(spec.prompt, spec.loras)
    return format_infotext(prompt, spec.negative_prompt, fields)


@hookimpl
def output_metadata(spec: RenderSpec, family: Family) -> dict[str, str]:
    """The PNG "parameters" entry of every output, with the family's own extra fields.

    Pillow writes it as a tEXt chunk, or as iTXt (UTF-8) when the text is not Latin-1.
    """
    version = f"lorafarm {LORAFARM_VERSION}"
    return {"parameters": infotext_for(spec, family.infotext_fields(spec), version=version)}


# --- writing -------------------------------------------------------------------------------


def _ordered_fields(fields: Iterable[tuple[str, object]]) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = []
    seen: set[str] = set()
    for key, value in fields:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(
                f"infotext key {key!r} cannot be read back by A1111: use two or more letters, "
                "digits, spaces, '-' or '/', starting with a letter or digit."
            )
        if key in seen:
            raise ValueError(f"infotext key {key!r} is given twice.")
        seen.add(key)
        if value is not None:
            pairs.append((key, value))
    steps = [pair for pair in pairs if pair[0] == "Steps"]
    if not steps:
        raise ValueError(
            "the infotext needs a Steps field: Civitai reads the parameters only from a last "
            "line that starts with 'Steps: '."
        )
    return steps + [pair for pair in pairs if pair[0] != "Steps"]


def _format_value(key: str, value: object) -> str:
    if isinstance(value, Mapping):
        return _json_object(key, value)
    text = _format_scalar(value)
    if any(trigger in text for trigger in _QUOTE_TRIGGERS) or text != text.strip():
        # ensure_ascii=False as A1111 does: a Japanese prompt in a value stays readable.
        return json.dumps(text, ensure_ascii=False)
    return text


def _format_scalar(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # A1111 shows "CFG scale: 7", not "7.0"
    return str(value)  # bool -> "True", float -> shortest repr ("6.5")


def _json_object(key: str, value: Mapping[object, object]) -> str:
    """A flat JSON object on one line; readers find its end at the first "}"."""
    for item_key, item in value.items():
        if not isinstance(item_key, str) or not isinstance(item, str | int | float | bool):
            raise ValueError(
                f"infotext field {key!r}: only a flat object of strings and numbers can be "
                f"written, not {item_key!r}: {item!r}."
            )
    text = json.dumps(dict(value), ensure_ascii=False, separators=(",", ":"))
    if "{" in text[1:-1] or "}" in text[1:-1]:
        raise ValueError(
            f"infotext field {key!r}: braces inside the object would end it early for readers."
        )
    return text


def _safe_name(name: str) -> str:
    return _UNSAFE_NAME_CHARS.sub("", name)


def _format_weight(weight: float) -> str:
    return _format_scalar(float(weight))


def _lora_tag(lora: LoraUse) -> str:
    """A1111's prompt tag; with two weights the text-encoder one comes first, then the UNet's."""
    name = _safe_name(lora.name)
    te = lora.text_encoder_strength
    if te is None or te == lora.strength:
        return f"<lora:{name}:{_format_weight(lora.strength)}>"
    return f"<lora:{name}:{_format_weight(te)}:{_format_weight(lora.strength)}>"


def _prompt_with_lora_tags(prompt: str, loras: Iterable[LoraUse]) -> str:
    # A space, not ", ": A1111 deletes the tags before encoding, and a dangling comma would
    # change the conditioning of a re-render there; trailing spaces do not.
    tags = [_lora_tag(lora) for lora in loras if f"<lora:{_safe_name(lora.name)}:" not in prompt]
    if not tags:
        return prompt
    base = prompt.rstrip()
    return " ".join([base, *tags]) if base else " ".join(tags)


def _lora_hashes(loras: Iterable[LoraUse]) -> str | None:
    hashes = [f"{_safe_name(lora.name)}: {lora.autov3}" for lora in loras if lora.autov3]
    return ", ".join(hashes) or None


def _civitai_hashes(spec: RenderSpec) -> dict[str, str] | None:
    hashes: dict[str, str] = {}
    if spec.checkpoint_hash:
        hashes["model"] = spec.checkpoint_hash
    for lora in spec.loras:
        if lora.autov2:
            hashes[f"lora:{_safe_name(lora.name)}"] = lora.autov2
    for embedding in spec.extra.get("embeddings") or []:
        if embedding.get("autov2"):
            hashes[f"embed:{_safe_name(embedding['name'])}"] = embedding["autov2"]
    return hashes or None


# --- reading -------------------------------------------------------------------------------


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return raw  # A1111 keeps such a value as written
        return value if isinstance(value, str) else raw
    return raw.rstrip()


def _split_prompt(lines: list[str]) -> tuple[str, str]:
    for index, line in enumerate(lines):
        if line.startswith(_NEGATIVE_PREFIX):
            first = line[len(_NEGATIVE_PREFIX) :]
            first = first[1:] if first.startswith(" ") else first
            return "\n".join(lines[:index]), "\n".join([first, *lines[index + 1 :]])
    return "\n".join(lines), ""
