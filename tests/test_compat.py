"""The KV-cache keyword across the transformers rename (past_key_values -> cache)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from prefalign import Aligner
from prefalign.compat import CACHE, LEGACY_CACHE, cache_keyword, cache_kwargs, output_cache
from prefalign.pad_fused import FusedPadModel
from prefalign.prm import build_prm


class LegacyCausalLM(nn.Module):
    """A model written before the rename: its forward only knows ``past_key_values``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        if past_key_values is None:
            raise AssertionError("the engine must hand a legacy model its cache as past_key_values")
        self.calls += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, logits_to_keep=logits_to_keep,
                          **cache_kwargs(self.inner, past_key_values))


def _declares_cache(model: nn.Module) -> bool:
    return CACHE in inspect.signature(type(model).forward).parameters


def _release_has_the_rename() -> bool:
    from transformers import LlamaForCausalLM

    return CACHE in inspect.signature(LlamaForCausalLM.forward).parameters


def test_keyword_follows_the_declared_forward(tiny_model):
    expected = CACHE if _declares_cache(tiny_model) else LEGACY_CACHE
    assert cache_keyword(tiny_model) == expected
    assert cache_keyword(LegacyCausalLM(tiny_model)) == LEGACY_CACHE

    class KwargsOnly(nn.Module):
        def forward(self, **kwargs):
            return kwargs

    assert cache_keyword(KwargsOnly()) == LEGACY_CACHE  # the older name is the one every 5.x release accepts


def test_wrappers_answer_for_the_model_they_wrap(tiny_llama):
    prm = build_prm(tiny_llama)
    assert prm.cache_keyword == cache_keyword(prm.backbone)
    assert cache_keyword(FusedPadModel(tiny_llama, prm)) == cache_keyword(tiny_llama)


def test_prm_returns_its_cache_under_the_output_class_field(tiny_llama, tokenizer):
    from transformers import DynamicCache

    prm = build_prm(tiny_llama)
    cache = DynamicCache(config=prm.config)
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    with torch.no_grad():
        out = prm(input_ids=ids, use_cache=True, **cache_kwargs(prm, cache))
    assert output_cache(out) is cache and cache.get_seq_length() == ids.shape[1]


def test_engine_decodes_a_legacy_model_like_the_model_itself(tiny_llama, tokenizer):
    legacy = LegacyCausalLM(tiny_llama)
    kwargs = dict(preference="concise", method="amulet", max_new_tokens=10, ignore_eos=True)
    expected = [r.token_ids for r in Aligner(tiny_llama, tokenizer).generate(["Hi", "List three fruits."], **kwargs)]
    got = [r.token_ids for r in Aligner(legacy, tokenizer).generate(["Hi", "List three fruits."], **kwargs)]
    assert got == expected and legacy.calls > 0


@pytest.mark.skipif(not _release_has_the_rename(), reason="this transformers release predates the cache rename")
def test_engine_and_prm_pass_the_cache_without_deprecation_warnings(tiny_llama, tokenizer):
    al = Aligner(tiny_llama, tokenizer)
    prm = build_prm(tiny_llama)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        al.generate("Hi", preference="concise", method="la", max_new_tokens=4)
        from transformers import DynamicCache

        cache = DynamicCache(config=prm.config)
        with torch.no_grad():
            prm(input_ids=torch.tensor([[1, 5, 7]]), use_cache=True, **cache_kwargs(prm, cache))
