"""Wildcards in prompts, through the `dynamicprompts` library (sd-dynamic-prompts' engine):
`{red|blue|green}`, `{2$$a|b|c}`, and `__name__` for a line of wildcards/name.txt (folders
give `__sub/name__`; a wildcard file may itself hold wildcards).

By default each render draws its prompt at random, seeded from the render's seed, so a
re-render draws the same prompt; `combinatorial = true` renders every combination instead.
A `__name__` that no file answers is refused at intake with the name: the library itself
would leave it in the prompt as literal text.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
from dynamicprompts.wildcards import WildcardManager

from daemon.contract.jobfile import JobFileError

_WILDCARD = re.compile(r"__([^\s_](?:[^\s]*?[^\s_])?)__")


def has_dynamic_syntax(text: str | None) -> bool:
    """Whether `text` holds a variant `{...}` or a `__name__` wildcard."""
    return bool(text) and ("{" in text or _WILDCARD.search(text) is not None)  # type: ignore[operator]


class Wildcards:
    """The wildcard files under one folder (read afresh for each job: a simple scan)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manager = WildcardManager(folder if folder.is_dir() else None)

    def names(self) -> list[str]:
        return sorted(self.manager.get_collection_names()) if self.folder.is_dir() else []

    def check(self, template: str, key: str, line: int | None) -> None:
        """Refuse a template that names a wildcard no file holds (nested ones too)."""
        seen: set[str] = set()
        pending = [template]
        while pending:
            for name in _WILDCARD.findall(pending.pop()):
                if name in seen:
                    continue
                seen.add(name)
                values = self.manager.get_values(name) if self.folder.is_dir() else ()
                if not values:
                    known = ", ".join(f"__{n}__" for n in self.names()) or "none"
                    raise JobFileError(
                        f"wildcard __{name}__ has no file: no {name}.txt in {self.folder}",
                        key=key, line=line,
                        fix=f"add {self.folder / name}.txt with one value a line, or fix the "
                            f"name (known wildcards: {known})")
                pending += [str(value) for value in values]

    def random(self, template: str, seed: int, key: str = "prompt",
               line: int | None = None) -> str:
        """One expansion, the same for the same seed; raises JobFileError for a template the
        library cannot read."""
        generator = RandomPromptGenerator(self.manager)
        with _readable(template, key, line):
            return str(generator.generate(template, 1, seeds=[seed])[0])

    def combinations(self, template: str, limit: int, key: str = "prompt",
                     line: int | None = None) -> list[str]:
        """Every expansion, at most `limit + 1` (more than `limit` means too many)."""
        generator = CombinatorialPromptGenerator(self.manager)
        with _readable(template, key, line):
            return [str(p) for p in generator.generate(template, max_prompts=limit + 1)]


@contextlib.contextmanager
def _readable(template: str, key: str, line: int | None) -> Iterator[None]:
    """A template dynamicprompts cannot parse (an unclosed `{`, an unsupported command)
    is the job's error, said as one."""
    try:
        yield
    except Exception as exc:  # pyparsing's ParseException, NotImplementedError, ...
        raise JobFileError(f"the wildcard syntax in {template!r} cannot be read: "
                           f"{type(exc).__name__}: {exc}", key=key, line=line,
                           fix="close every { with }, separate choices with |, e.g. "
                               "{red|blue|green}; write {2$$a|b|c} to pick two") from exc
