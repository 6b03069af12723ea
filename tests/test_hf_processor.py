"""The transformers-native logits processor gives the engine's answers inside model.generate."""

from __future__ import annotations

import pytest
import torch

from prefalign import Aligner
from prefalign.errors import PrefalignError
from prefalign.hf import PreferenceLogitsProcessor

PROMPTS = ["Hi", "Explain why the sky is blue."]


# The papers' rules (kl_budget=0): generate hands the processor scores in which min_new_tokens
# has banned EOS, i.e. a renormalised p; the rules are invariant to that, the KL safeguard is not.
@pytest.mark.parametrize(("method", "params"), [("amulet", {"kl_budget": 0.0}), ("la", {"ratio": 1.0, "kl_budget": 0.0})])
def test_processor_in_generate_equals_engine(tiny_llama, tokenizer, method, params):
    proc = PreferenceLogitsProcessor.from_prompt(tiny_llama, tokenizer, PROMPTS, preference="concise", method=method, **params)
    out = tiny_llama.generate(
        **proc.preference_inputs, logits_processor=[proc], max_new_tokens=10, min_new_tokens=10,
        do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )
    generated = out[:, proc.preference_inputs["input_ids"].shape[1]:].tolist()
    expected = Aligner(tiny_llama, tokenizer).generate(PROMPTS, preference="concise", method=method, max_new_tokens=10, ignore_eos=True, **params)
    assert generated == [r.token_ids for r in expected]


def test_processor_rejects_engine_only_methods(tiny_llama, tokenizer):
    with pytest.raises(PrefalignError, match="Engine"):
        PreferenceLogitsProcessor.from_prompt(tiny_llama, tokenizer, "Hi", preference="concise", method="beam")
    with pytest.raises(PrefalignError, match="one preference"):
        PreferenceLogitsProcessor.from_prompt(tiny_llama, tokenizer, "Hi", preference=["concise", "formal"])


def test_processor_rejects_beam_reordering(tiny_llama, tokenizer):
    proc = PreferenceLogitsProcessor.from_prompt(tiny_llama, tokenizer, "Hi", preference="concise")
    with pytest.raises(PrefalignError, match="beam"):
        tiny_llama.generate(**proc.preference_inputs, logits_processor=[proc], max_new_tokens=3, num_beams=2, pad_token_id=tokenizer.pad_token_id)
    assert torch.is_tensor(proc.base_ids)
