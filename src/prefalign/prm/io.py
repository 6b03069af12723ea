"""Save and load personalised reward models as small directories.

A PRM directory holds::

    prm_config.json            format, base model, tokenizer fingerprint, preferences,
                               template, LoRA settings, training metadata
    adapter_model.safetensors  LoRA matrices (peft key names, fp16 by default)
    linear.safetensors         ``delta_weight`` = W − I of the Linear(d, d) layer (fp16)

Storing the linear layer as its difference from the identity keeps fp16's precision
where it matters (the update is small next to the 1.0 diagonal).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import PrefalignError, TokenizerMismatchError
from ..rules import check_prm_path
from .model import PersonalizedRewardModel, build_prm

FORMAT = "prefalign-prm"
FORMAT_VERSION = 1
CONFIG_NAME = "prm_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
LINEAR_FILE = "linear.safetensors"
#: Where the shipped PRM of the embedded model lives inside the package.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "prm" / "smollm2-135m"

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_prm_path() -> Path:
    """The PRM shipped for the embedded SmolLM2-135M-Instruct model."""
    if not (SHIPPED_DIR / CONFIG_NAME).is_file():
        raise PrefalignError(
            f"no PRM is shipped for the embedded model in this installation (expected {SHIPPED_DIR}); "
            "train one with `prefalign make-pairs` and `prefalign train-prm` (docs/prm.md) and pass its path",
            field="prm",
        )
    return SHIPPED_DIR


def read_prm_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``prm_config.json`` of a PRM directory (or of the file itself)."""
    path = Path(path)
    file = path if path.is_file() else check_prm_path(path) / CONFIG_NAME
    config = json.loads(file.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise PrefalignError(f"{file} is not a prefalign PRM config (format {config.get('format')!r})", field="prm")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise PrefalignError(
            f"{file} was written by a newer prefalign (format {config['format_version']}); upgrade prefalign",
            field="prm",
        )
    return config


def _atomic_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _commit_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def save_prm(
    prm: PersonalizedRewardModel,
    path: str | os.PathLike[str],
    tokenizer: Any,
    *,
    base_model_name: str,
    preferences: list[str],
    extra: dict[str, Any] | None = None,
    dtype: str = "float16",
    template: str = "pad",
) -> Path:
    """Write ``prm`` (adapters, linear layer, config) to directory ``path``, atomically."""
    from safetensors.torch import save_file

    from ..models import tokenizer_fingerprint

    if dtype not in _DTYPES:
        raise PrefalignError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}", field="dtype")
    store = _DTYPES[dtype]
    target = Path(path)
    adapters = {k: v.detach().to("cpu", store).contiguous() for k, v in prm.adapter_state_dict().items()}
    w = prm.linear.weight.detach().float().cpu()
    delta = (w - torch.eye(w.shape[0])).to(store).contiguous()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model_name,
        "base_model_config": {
            k: getattr(prm.config, k, None)
            for k in ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads")
        },
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "preferences": list(preferences),
        "template": template,
        "lora": lora_layout(prm),
        "dtype": dtype,
        "linear": "delta_weight = W - I",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extra": extra or {},
    }
    tmp = _atomic_dir(target)
    try:
        save_file(adapters, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        save_file({"delta_weight": delta}, str(tmp / LINEAR_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        _commit_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_tokenizer(config: dict[str, Any], tokenizer: Any, path: Path | str) -> None:
    """Raise :class:`TokenizerMismatchError` when ``tokenizer`` is not the PRM's."""
    from ..models import tokenizer_fingerprint

    expected = config.get("tokenizer_fingerprint")
    actual = tokenizer_fingerprint(tokenizer)
    if expected != actual:
        raise TokenizerMismatchError(
            f"the PRM at {path} was trained for a tokenizer with fingerprint {expected} "
            f"(base model {config.get('base_model')!r}), but the policy's tokenizer has fingerprint {actual}; "
            "a PRM must share its policy's tokenizer — use a PRM trained for this model "
            "(prefalign train-prm --model ...)",
            field="prm",
        )


def load_prm(
    path: str | os.PathLike[str],
    policy_model: Any,
    tokenizer: Any,
    *,
    merge: bool = True,
) -> PersonalizedRewardModel:
    """Load the PRM at ``path`` on top of ``policy_model`` (shared frozen weights).

    Raises :class:`~prefalign.errors.TokenizerMismatchError` if ``tokenizer`` differs
    from the one the PRM was trained with. With ``merge`` (default) the LoRA matrices
    are folded into new weight tensors of the adapted layers (plain linear layers:
    faster decoding; logits within float rounding of the unmerged model, see
    docs/prm.md). The policy is never modified and may be fast-path accelerated
    before or after.
    """
    prm = load_prm_for_training(path, policy_model, tokenizer)
    for p in prm.parameters():
        p.requires_grad_(False)
    if merge:
        prm.merge_adapters()
    prm.eval()
    return prm


def lora_layout(prm: PersonalizedRewardModel) -> dict[str, Any]:
    """The PRM's LoRA settings as saved in ``prm_config.json`` (``build_prm`` arguments)."""
    from .model import _layer_index

    lora = prm.lora_config
    targets = lora.target_modules
    layers = None
    if not isinstance(targets, str) and any(_layer_index(t) is not None for t in targets):
        layers = sorted({_layer_index(t) for t in targets if _layer_index(t) is not None})
        targets = {t.rpartition(".")[2] for t in targets}
    return {
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
        "lora_dropout": lora.lora_dropout,
        "layers": layers,
    }


def build_from_layout(policy_model: Any, lora: dict[str, Any]) -> PersonalizedRewardModel:
    """An untrained PRM with the LoRA layout ``lora`` (see :func:`lora_layout`)."""
    return build_prm(
        policy_model,
        lora_r=int(lora["r"]),
        lora_alpha=int(lora["lora_alpha"]),
        target_modules=lora["target_modules"],
        lora_dropout=float(lora.get("lora_dropout", 0.0)),
        layers=lora.get("layers"),
    )


def _check_shape(config: dict[str, Any], policy_model: Any, path: Path) -> None:
    expected = config.get("base_model_config", {})
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        want, got = expected.get(key), getattr(policy_model.config, key, None)
        if want is not None and got is not None and want != got:
            raise PrefalignError(
                f"the PRM at {path} was trained on {config.get('base_model')!r} ({key}={want}); "
                f"this policy has {key}={got}",
                field="prm",
            )


def _build_and_fill(path: Path, config: dict[str, Any], policy_model: Any) -> PersonalizedRewardModel:
    """A PRM with the LoRA layout of ``config`` over ``policy_model``, weights from ``path``
    (trainable parameters still trainable)."""
    from safetensors.torch import load_file

    prm = build_from_layout(policy_model, config["lora"])
    dtype = prm.dtype
    device = prm.device
    state = {k: v.to(device, dtype) for k, v in load_file(str(path / ADAPTER_FILE)).items()}
    prm.load_adapter_state_dict(state)
    delta = load_file(str(path / LINEAR_FILE))["delta_weight"].float()
    with torch.no_grad():
        prm.linear.weight.copy_((torch.eye(delta.shape[0]) + delta).to(device, dtype))
    return prm


def load_prm_for_training(path: str | os.PathLike[str], policy_model: Any, tokenizer: Any) -> PersonalizedRewardModel:
    """The PRM at ``path``, unmerged and trainable: the starting point of a further
    training round (``prefalign train-prm --init PATH``). Same checks as :func:`load_prm`."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    config = read_prm_config(path)
    check_tokenizer(config, tokenizer, path)
    _check_shape(config, policy_model, path)
    prm = _build_and_fill(path, config, policy_model)
    prm.prm_config = config  # type: ignore[attr-defined]
    return prm
