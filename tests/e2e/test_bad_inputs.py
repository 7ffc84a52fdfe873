"""Bad input never stops the daemon: each gets a clear error, and everything else goes on."""

from __future__ import annotations

import errno
import json
import sqlite3
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.contract.jobfile import KEYS, JobFileError
from families.sdxl.tiny_loras import make_tiny_lora, write_kohya_original
from tests.conftest import sdxl_job

FUZZ_EXAMPLES = 300

_values = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_keys = st.one_of(st.sampled_from(sorted(KEYS)), st.text(string.ascii_letters + "_", min_size=1,
                                                         max_size=12))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return json.dumps(value)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.dictionaries(_keys, _values, max_size=8), as_json=st.booleans(),
       base=st.booleans())
def test_fuzzed_job_files_are_accepted_or_rejected_with_a_report(started_daemon, data, as_json,
                                                                   base) -> None:
    if base:  # half of the examples start from a valid job, so deep checks are reached too
        data = {"checkpoint": "tiny-sdxl", "prompt": "a cat", "width": 64, "height": 64,
                **data}
    if as_json:
        raw = json.dumps({k: v for k, v in data.items()}, allow_nan=True).encode()
        name = "fuzz.json"
    else:
        lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items()
                 if v is not None]
        raw = "\n".join(lines).encode()
        name = "fuzz.toml"
    try:
        spec, renders, _warnings = started_daemon.intake.resolver.parse(name, raw)
    except JobFileError as exc:
        assert exc.what and exc.report().strip()
    else:
        assert spec.checkpoint and renders
        assert all(r.width % 8 == 0 and 1 <= r.steps <= 150 for r in renders)


def test_fuzzed_bytes_never_raise_anything_but_a_job_error(started_daemon) -> None:
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    @given(raw=st.binary(max_size=300), suffix=st.sampled_from([".toml", ".json"]))
    def check(raw: bytes, suffix: str) -> None:
        try:
            started_daemon.intake.resolver.parse(f"bytes{suffix}", raw)
        except JobFileError:
            pass
    check()


def test_empty_binary_non_utf8_huge_and_over_limit_files(farm) -> None:
    farm.drop("empty.toml", b"")
    farm.drop("binary.json", bytes(range(256)))
    farm.drop("latin1.toml", 'checkpoint = "tiny-sdxl"\nprompt = "caf\xe9"\n'.encode("latin-1"))
    farm.drop("huge.toml", b"# " + b"x" * (2 * 1024 * 1024))
    farm.drop("wide.toml", sdxl_job(count=1).replace("width = 64", "width = 4096"))
    farm.drop("many.toml", sdxl_job(count=1).replace("count = 1", "count = 1000"))
    farm.drop("ok.toml", sdxl_job(count=1))
    assert farm.run() == 0
    assert farm.files_in("done") == ["ok.toml"]

    assert "required key `checkpoint` is missing" in farm.rejection("empty.toml")
    assert "binary" in farm.rejection("binary.json")
    assert "not UTF-8" in farm.rejection("latin1.toml")
    assert "at most 1048576 bytes" in farm.rejection("huge.toml")
    assert "`width` = 4096 is out of range; allowed 64 to 2048" in farm.rejection("wide.toml")
    assert "`count` = 1000 is out of range; allowed 1 to 100" in farm.rejection("many.toml")


def test_a_job_file_removed_while_processing_still_renders(farm) -> None:
    farm.drop("vanish.toml", sdxl_job(count=1))
    daemon = farm.daemon()
    daemon.start()
    (farm.jobs / "processing" / "vanish.toml").unlink()  # the user deletes it meanwhile
    daemon.close()
    assert farm.run() == 0
    [job] = farm.history()
    assert job["state"] == "done"  # the database, not the folder, is the source of truth


def test_a_lora_deleted_while_its_job_waits_fails_that_render_clearly(farm) -> None:
    loras = farm.config.paths.loras
    write_kohya_original(make_tiny_lora(seed=3), loras / "gone.safetensors",
                         metadata={"ss_sd_model_name": "sd_xl_base_1.0"})
    farm.drop("needs-lora.toml", sdxl_job(count=1) + '\n[[loras]]\nname = "gone"\n')
    farm.drop("plain.toml", sdxl_job(count=1, seed=99))
    daemon = farm.daemon()
    daemon.start()  # both accepted
    daemon.close()
    (loras / "gone.safetensors").unlink()
    assert farm.run() == 0
    jobs = {job["name"]: job for job in farm.history()}
    assert jobs["plain"]["state"] == "done"
    assert jobs["needs-lora"]["state"] == "failed"
    assert "no longer in the library" in jobs["needs-lora"]["renders"][0]["error"]


def test_a_checkpoint_deleted_while_its_job_waits_fails_clearly(make_farm) -> None:
    farm = make_farm(private_models=True)
    farm.drop("doomed.toml", sdxl_job(checkpoint="tiny-sdxl-single", count=1))
    daemon = farm.daemon()
    daemon.start()
    daemon.close()
    (farm.config.paths.models / "tiny-sdxl-single.safetensors").unlink()
    assert farm.run() == 0
    [job] = farm.history()
    assert job["state"] == "failed"
    assert "tiny-sdxl-single" in job["renders"][0]["error"]
    assert "gone" in job["renders"][0]["error"]


def test_a_full_disk_while_writing_retries_the_render_later(farm, monkeypatch) -> None:
    import daemon.output.writer as writer_module

    real = writer_module.write_png
    failures = []

    def full_once(image, path, spec, text):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(image, path, spec, text)

    monkeypatch.setattr(writer_module, "write_png", full_once)
    farm.drop("disk.toml", sdxl_job(count=2))
    assert farm.run() == 0
    [job] = farm.history()
    assert job["state"] == "done" and len(failures) == 1
    assert sorted(r["attempts"] for r in job["renders"]) == [1, 2]
    assert len(list(farm.outputs.rglob("*.png"))) == 2


def test_a_long_reader_does_not_stop_the_daemon(farm) -> None:
    farm.drop("first.toml", sdxl_job(count=1))
    assert farm.run() == 0
    reader = sqlite3.connect(farm.config.paths.database)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM renders").fetchone()[0] == 1  # snapshot held
    farm.drop("second.toml", sdxl_job(count=1, seed=77))
    assert farm.run() == 0
    assert reader.execute("SELECT count(*) FROM renders").fetchone()[0] == 1  # its snapshot
    reader.rollback()
    assert reader.execute("SELECT count(*) FROM renders").fetchone()[0] == 2
    reader.close()


def test_backup_while_the_database_is_in_use(farm, tmp_path) -> None:
    farm.drop("b.toml", sdxl_job(count=1))
    assert farm.run() == 0
    result = farm.cli("backup", str(tmp_path / "copies"), "--config",
                      str(farm.write_config_file()))
    assert result.returncode == 0, result.stderr
    [copy] = list((tmp_path / "copies").glob("lorafarm-*.sqlite"))
    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM renders WHERE state = 'done'").fetchone()[0] == 1
    assert copy.stat().st_mode & 0o077 == 0
