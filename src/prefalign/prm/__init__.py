"""Personalised reward models (PAD): build, train with DPO, save and load.

>>> from prefalign.prm import build_prm, load_prm, save_prm, default_prm_path
>>> prm = load_prm(default_prm_path(), policy_model, tokenizer)   # the shipped PRM

See docs/prm.md.
"""

from __future__ import annotations

from .model import DEFAULT_TARGET_MODULES, PersonalizedRewardModel, build_prm

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "PersonalizedRewardModel",
    "build_prm",
    "default_prm_path",
    "load_prm",
    "save_prm",
]


def __getattr__(name: str):  # lazy: io pulls in safetensors only when used
    if name in ("save_prm", "load_prm", "default_prm_path", "read_prm_config"):
        from . import io

        return getattr(io, name)
    raise AttributeError(name)
