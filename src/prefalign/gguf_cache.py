"""The conversion cache: a GGUF file de-quantised once into a safetensors directory.

Kept apart from :mod:`prefalign.models` (which re-exports these names) so that
:mod:`prefalign.local_models` can convert what it installs without importing the
loader that resolves its short names (no import cycle, tests/test_imports.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .paths import cache_dir


def existing_gguf(path: Path) -> Path:
    """``path`` if it is a file, else the loaders' one "GGUF file not found" error."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}", field="model")
    return path

log = logging.getLogger("prefalign.models")


def _hash_index() -> Path:
    return cache_dir() / "hashes.json"


def content_hash(path: Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes, memoised by path, size and mtime.

    The conversion cache is keyed by this, so identical weights installed in several
    environments share one converted copy.
    """
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_file = _hash_index()
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(key), str):
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()[:16]
    index = index if isinstance(index, dict) else {}
    index[key] = value
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f".{index_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(index_file)
    except OSError:  # a read-only cache still works, it only hashes again next time
        pass
    return value


def _converted_gguf_dir(gguf: Path) -> Path:
    """Convert a GGUF file once into a safetensors directory in the cache; return it."""
    target = cache_dir() / "converted" / _cache_key(gguf)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors, once (about 25 s); cached in %s", gguf.name, target)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}", field="model") from exc
    # The de-quantised weights are plain fp32: drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    _save_into_cache(target, model, tokenizer)
    return target


def _cache_key(gguf: Path) -> str:
    return f"{gguf.stem}-{content_hash(gguf)}"


def _save_into_cache(target: Path, *objects: Any) -> None:
    """``save_pretrained`` each object into ``target``, replacing it whole.

    They are written to a temporary sibling that is then renamed, so an interrupted save
    leaves no half cache.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bar for the duration."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def read_gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer of a GGUF file, without converting its weights.

    The llama.cpp backend needs only the tokenizer from transformers; converting a 1.5B
    model's weights for it would take minutes and ~7 GB. Uses the converted directory when
    one exists, else reads the tokenizer from the GGUF once and caches it on its own.
    """
    from transformers import AutoTokenizer

    key = _cache_key(gguf)
    for target in (cache_dir() / "converted" / key, cache_dir() / "tokenizers" / key):
        if (target / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(target))
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot read the tokenizer of GGUF file {gguf}: {exc}", field="model") from exc
    _save_into_cache(target, tokenizer)  # the loop left target at the tokenizer-only directory
    return tokenizer

