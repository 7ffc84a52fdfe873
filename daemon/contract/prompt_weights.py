"""A1111 prompt weighting: parse it, hand it to compel, or strip it.

Users bring prompts written for AUTOMATIC1111: `(word:1.3)` sets a weight, `(word)`
multiplies by 1.1, `[word]` divides by 1.1, brackets nest and multiply, `\\(` `\\)` `\\[` `\\]`
`\\\\` are literal characters, and `BREAK` starts a new 75-token chunk. This module reads that
syntax the way A1111's `prompt_parser.parse_prompt_attention` does, with one deliberate
difference: an unmatched bracket is kept as a literal character and reported (A1111 silently
weights the rest of the prompt after an unclosed bracket, which is nearly always a typo).

Three uses:
* `parse_prompt` -> `ParsedPrompt`: runs of text with their weights, split at BREAK;
* `to_compel_conjunction` / `to_compel_syntax`: the same in compel's terms (SDXL lineage,
  Flux.1); the conjunction is built directly, because compel's text parser rewrites user
  text (`word+`, `word-`, quotes, `.swap(`), so a text round trip is not lossless;
* `strip_explicit_weights` / `unweighted_notes`: text for encoders nothing can weight (Flux 2,
  Wan, HunyuanVideo), and the warning that says so. Those families keep the prompt as
  written in the render spec (history, infotext, rerenders) and strip it only where it is
  handed to the pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compel.prompt_parser import Conjunction

ROUND_MULTIPLIER = 1.1  # A1111: `(x)` multiplies by 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # A1111: `[x]` divides by 1.1

# A1111's tokens, in its order of preference: escapes, a lone backslash, openers, an
# explicit-weight closer `:1.3)`, closers, plain text, a stray colon.
_TOKEN = re.compile(r"""
\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# A1111 prompt editing / alternation, `[cat:dog:0.5]`, `[cat|dog]`: another parser (steps
# schedules) that neither diffusers nor compel have.
_PROMPT_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*(?:\|[^\[\]]*|:[^\[\]]*:\s*[\d.]+\s*)\]")


@dataclass(frozen=True)
class WeightedText:
    """A run of prompt text and its weight (1.0: unweighted)."""

    text: str
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as A1111 reads it: one tuple of weighted runs per BREAK-separated chunk."""

    chunks: tuple[tuple[WeightedText, ...], ...]
    warnings: tuple[str, ...] = ()

    @property
    def has_weights(self) -> bool:
        """True when encoding the plain text would lose something: a weight or a BREAK."""
        return len(self.chunks) > 1 or any(
            run.weight != 1.0 for chunk in self.chunks for run in chunk)

    @property
    def weighted(self) -> bool:
        """True when some run has a weight other than 1 (a BREAK alone does not count)."""
        return any(run.weight != 1.0 for chunk in self.chunks for run in chunk)

    @property
    def plain_chunks(self) -> list[str]:
        return ["".join(run.text for run in chunk) for chunk in self.chunks]

    @property
    def stripped(self) -> str:
        """The text with weights, brackets and escapes resolved and BREAK read as a space; a
        prompt without weights or BREAK exactly as written (escapes resolved)."""
        if not self.has_weights:
            return "".join(self.plain_chunks)
        return " ".join(chunk.strip() for chunk in self.plain_chunks)

    @property
    def plain_text(self) -> str:
        """The text with weights, brackets and escapes resolved; BREAK kept as a word so that
        encoders without chunking still see a boundary, as A1111's own text does."""
        return " BREAK ".join(self.plain_chunks)


def _merge(runs: list[WeightedText]) -> tuple[WeightedText, ...]:
    """Join neighbours of equal weight and drop empty runs, as A1111 does."""
    merged: list[WeightedText] = []
    for run in runs:
        if not run.text:
            continue
        if merged and merged[-1].weight == run.weight:
            merged[-1] = WeightedText(merged[-1].text + run.text, run.weight)
        else:
            merged.append(run)
    return tuple(merged) or (WeightedText("", 1.0),)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse A1111 attention syntax into weighted runs per BREAK chunk.

    Weights multiply through nesting exactly as in A1111 (`((a:1.3))` is 1.3 * 1.1).
    Unmatched brackets stay in the text as characters, with a warning.
    """
    # Each entry: [text, weight]; an opener is entered as its literal character and blanked
    # when its closer turns up, so that an unmatched opener is literal text in place.
    res: list[list[str | float]] = []
    breaks: list[int] = []  # indices in `res` where a new chunk starts
    round_open: list[int] = []
    square_open: list[int] = []
    stray: list[str] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for entry in res[start:]:
            entry[1] = float(entry[1]) * multiplier

    for match in _TOKEN.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            # An escape is its second character; a lone backslash is dropped, as in A1111.
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
            res.append(["(", 1.0])
        elif token == "[":
            square_open.append(len(res))
            res.append(["[", 1.0])
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:  # `(a:1.2.3)`: not a number, so not a weight
                res.append([token, 1.0])
                continue
            start = round_open.pop()
            res[start][0] = ""
            multiply_range(start, value)
        elif token == ")" and round_open:
            start = round_open.pop()
            res[start][0] = ""
            multiply_range(start, ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            start = square_open.pop()
            res[start][0] = ""
            multiply_range(start, SQUARE_MULTIPLIER)
        else:
            if token == ")" or token == "]" or (weight is not None):
                stray.append(token.strip())
            parts = _BREAK.split(token)
            for i, part in enumerate(parts):
                if i:
                    breaks.append(len(res))
                res.append([part, 1.0])

    warnings: list[str] = []
    unclosed = [str(res[i][0]) for i in round_open + square_open]
    if unclosed or stray:
        shown = ", ".join(f"{c!r}" for c in [*unclosed, *stray][:4])
        warnings.append(f"unbalanced brackets in the prompt ({shown}) are read as plain "
                        "characters; write \\( or \\) for a literal bracket")
    if _PROMPT_EDITING.search(prompt):
        warnings.append("A1111 prompt editing ([a:b:0.5], [a|b]) is not supported: it is read "
                        "as emphasis and text")
    if any(float(entry[1]) < 0 for entry in res):
        warnings.append("negative prompt weights are read as 0 (compel cannot invert a token)")

    chunks = []
    for start, end in zip([0, *breaks], [*breaks, len(res)], strict=True):
        chunks.append(_merge([WeightedText(str(t), float(w)) for t, w in res[start:end]]))
    return ParsedPrompt(chunks=tuple(chunks), warnings=tuple(warnings))


def strip_weights(prompt: str) -> tuple[str, bool]:
    """(the prompt as plain text, whether it had weighting or BREAK to lose), for encoders
    that nothing can weight. Brackets that do not weight anything stay as written."""
    parsed = parse_prompt(prompt)
    # The user's text exactly unless escapes need resolving (`\(` means `(`) or weights go.
    return parsed.stripped, parsed.has_weights


# `(text:1.2)` with nothing bracketed inside, not escaped: A1111's explicit weight.
_EXPLICIT_WEIGHT = re.compile(r"(?<!\\)\(((?:[^()\\]|\\.)*?)\s*:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*\)")
_ESCAPED = re.compile(r"\\([()\[\]\\])")


def strip_explicit_weights(prompt: str) -> tuple[str, list[str]]:
    """For encoders nothing can weight, which read natural language (Flux 2's Qwen3, Wan's
    UMT5, HunyuanVideo's Llama): (the text to encode, what was dropped).

    A1111's explicit weights `(text:1.2)` are read as `text` (innermost first, so nested
    ones resolve), BREAK as a space, and escapes (`\\(`) as the character. Plain `(text)` and
    `[text]` stay as written: in a sentence for these encoders they are punctuation ("a man
    (about 40) walks"), and a prompt written for A1111 loses little by keeping them. What was
    dropped is listed in A1111's notation, for the warning."""
    dropped: list[str] = []

    def plain(match: re.Match[str]) -> str:
        dropped.append(match.group(0))
        return match.group(1)

    text = prompt
    while (stripped := _EXPLICIT_WEIGHT.sub(plain, text)) != text:
        text = stripped
    if _BREAK.search(text):
        dropped.append("BREAK")
        text = _BREAK.sub(" ", text).strip()
    return _ESCAPED.sub(r"\1", text), dropped


def _shown_weights(parsed: ParsedPrompt, limit: int = 3) -> str:
    """The weighted runs in A1111's own notation, `(red:1.3)`, the first `limit` of them."""
    runs = [f"({run.text.strip()}:{run.weight:.3g})" for chunk in parsed.chunks
            for run in chunk if run.weight != 1.0 and run.text.strip()]
    return ", ".join(runs[:limit]) + (", ..." if len(runs) > limit else "")


def unweighted_notes(display_name: str, prompt: str, negative_prompt: str) -> list[str]:
    """Warnings for a family whose text encoder nothing can weight: for each prompt with
    explicit A1111 weights or BREAK, that they are dropped (the text goes to the encoder as
    `strip_explicit_weights` gives it), and that prompt editing is read as text."""
    notes = []
    for which, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        _, dropped = strip_explicit_weights(text)
        weights = [d for d in dropped if d != "BREAK"]
        said = []
        if weights:
            shown = ", ".join(weights[:3]) + (", ..." if len(weights) > 3 else "")
            said.append(f"{shown} read as plain text")
        if "BREAK" in dropped:
            said.append("BREAK read as a space")
        if said:
            notes.append(f"{which}: {display_name} has no prompt weighting: {'; '.join(said)}")
        if _PROMPT_EDITING.search(text):
            notes.append(f"{which}: A1111 prompt editing ([a:b:0.5], [a|b]) is not supported: "
                         "it is read as text")
    return notes


def to_compel_conjunction(parsed: ParsedPrompt, keep_breaks: bool = True) -> Conjunction:
    """compel's own structure for the prompt: one FlattenedPrompt per BREAK chunk, joined by
    AND, which compel encodes chunk by chunk and concatenates along the tokens, as A1111's
    BREAK does (each chunk padded to 77 tokens with its own start and end markers).

    `keep_breaks=False` puts all runs in one FlattenedPrompt, for encoders without 77-token
    chunks (Flux.1's T5), where a BREAK has nothing to start."""
    from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

    chunks = parsed.chunks if keep_breaks else (
        tuple(run for chunk in parsed.chunks for run in (*chunk, WeightedText(" ", 1.0)))[:-1],)
    prompts = []
    for chunk in chunks:
        fragments = []
        for run in chunk:
            fragment = Fragment("", max(run.weight, 0.0))
            # Set after construction: Fragment() would unescape `\(` in text that is already
            # literal (e.g. A1111's `\\\(`, a backslash then a bracket).
            fragment.text = run.text
            fragments.append(fragment)
        prompts.append(FlattenedPrompt(fragments))
    return Conjunction(prompts)


def _compel_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").replace('"', '\\"')


def _compel_weight(weight: float) -> str:
    return f"{max(weight, 0.0):.6g}"


def to_compel_syntax(prompt: str) -> str:
    """The prompt in compel's text syntax: `(text)1.21` per weighted run, and
    `("chunk one", "chunk two").and()` for BREAK. For tools that only take text (e.g.
    `CompelForFlux`); prefer `to_compel_conjunction`, since compel's text parser also reads
    `word+`, `word-` and `.swap(...)` in the user's plain text as operators."""
    parsed = parse_prompt(prompt)

    def chunk_text(chunk: tuple[WeightedText, ...]) -> str:
        parts = []
        for run in chunk:
            if run.weight == 1.0:
                parts.append(_compel_escape(run.text))
            elif run.text.strip():
                parts.append(f"({_compel_escape(run.text.strip())}){_compel_weight(run.weight)}")
        return " ".join(p.strip() for p in parts if p.strip())

    texts = [chunk_text(chunk) for chunk in parsed.chunks]
    if len(texts) == 1:
        return texts[0]
    quoted = ", ".join('"' + t.replace('"', '\\"') + '"' for t in texts)
    return f"({quoted}).and()"
