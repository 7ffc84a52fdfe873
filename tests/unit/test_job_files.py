"""Job-file checking: every bad value names the key, its line and the allowed range."""

from __future__ import annotations

import pytest

from daemon.config import Limits
from daemon.contract.jobfile import (
    JobFileError,
    check_job,
    decode_job_bytes,
    parse_json,
    parse_toml,
)


def _check(text: str, limits: Limits | None = None):  # type: ignore[no-untyped-def]
    return check_job(parse_toml(text), text, limits or Limits())


def test_a_minimal_job_gets_defaults_left_to_the_family() -> None:
    spec = _check('checkpoint = "m"\nprompt = "a cat"\n')
    assert spec.checkpoint == "m" and spec.count == 1 and spec.seed is None
    assert spec.steps is None and spec.sampler is None and spec.conventions is True


@pytest.mark.parametrize(("text", "expected"), [
    ('prompt = "a"\n', "required key `checkpoint` is missing"),
    ('checkpoint = "m"\nprompt = "  "\n', "the prompt is empty"),
    ('checkpoint = "m"\nprompt = "a"\ncount = 0\n', "`count` = 0 is out of range"),
    ('checkpoint = "m"\nprompt = "a"\nsteps = true\n', "`steps` must be a whole number"),
    ('checkpoint = "m"\nprompt = "a"\ncfg = "high"\n', "`cfg` must be a whole number or a number"),
    ('checkpoint = "m"\nprompt = "a"\nseed = -1\n', "`seed` = -1 is out of range"),
    ('checkpoint = "m"\nprompt = "a"\nwidht = 512\n', "did you mean `width`"),
])
def test_bad_values_say_what_and_where(text: str, expected: str) -> None:
    with pytest.raises(JobFileError) as info:
        _check(text)
    assert expected in str(info.value)
    assert "How to fix" in str(info.value)


def test_limits_come_from_the_config() -> None:
    with pytest.raises(JobFileError) as info:
        _check('checkpoint = "m"\nprompt = "a"\nwidth = 1024\n', Limits(max_width=768))
    assert "allowed 64 to 768 (limits.max_width in config.toml)" in str(info.value)
    assert info.value.line == 3 and info.value.key == "width"


def test_json_errors_carry_the_line() -> None:
    with pytest.raises(JobFileError) as info:
        parse_json('{\n"checkpoint": "m",\n"prompt": "a",,\n}')
    assert info.value.line == 3
    with pytest.raises(JobFileError, match="must be an object"):
        parse_json("[1, 2]")


def test_encodings() -> None:
    assert decode_job_bytes('\ufeffprompt = "é"'.encode()) == 'prompt = "é"'
    with pytest.raises(JobFileError, match="not UTF-8"):
        decode_job_bytes(b'prompt = "\xe9"')
    with pytest.raises(JobFileError, match="binary"):
        decode_job_bytes(b"\x00\x00")
