"""CPU fast path (prefalign.fastpath): exactness, fusion, caches, padding, fallback.

Behaviour only, never timings (see benchmarks/fastpath_speed.py for speed).
Tolerance for bf16: oneDNN rounds each linear layer's input and weight to bf16 (8
significant bits, relative error 2**-9 each) and accumulates in fp32; through a
2-layer model the logits then differ from fp32 by well under 2% of their largest
magnitude, which is the bound asserted here. fp32 fast path: 1e-5 relative.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from prefalign import fastpath
from prefalign.compat import cache_kwargs
from prefalign.fastpath import FastPathReport, PackedLinear, optimize_for_cpu, restore

BF16_RTOL = 2e-2  # of the largest |logit|; see module docstring
FP32_RTOL = 1e-5

# fp32 (the default, tokens identical to plain fp32) runs on any x86 CPU with oneDNN;
# bf16 needs AVX512 at least, so the bf16 cases are gated on their own.
needs_onednn = pytest.mark.skipif(
    not fastpath.is_supported(torch.float32),
    reason=f"oneDNN fast path unsupported here: {fastpath.unsupported_reason(torch.float32)}",
)
needs_bf16 = pytest.mark.skipif(
    not fastpath.is_supported(torch.bfloat16),
    reason=f"oneDNN bf16 fast path unsupported here: {fastpath.unsupported_reason(torch.bfloat16)}",
)
BF16 = pytest.param(torch.bfloat16, marks=needs_bf16, id="bf16")
DTYPES_AND_TOLERANCES = [
    (torch.float32, FP32_RTOL),
    pytest.param(torch.bfloat16, BF16_RTOL, marks=needs_bf16, id="bf16"),
]


def _tiny(seed: int = 0, tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return _tiny()


def _fast(model: nn.Module, **kwargs) -> tuple[nn.Module, FastPathReport]:
    fast = copy.deepcopy(model)
    report = optimize_for_cpu(fast, **kwargs)
    assert report.active, report.reason
    return fast, report


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    bound = rtol * expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


def _ids(batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, length), generator=gen)


# ----------------------------------------------------------------------- applying


@needs_onednn
def test_report_lists_replaced_and_fused_layers(tiny):
    fast, report = _fast(tiny)
    assert report.active and report.reason == "applied"
    assert report.dtype == torch.float32 and report.lm_head_dtype == torch.float32
    linears = [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(report.replaced) == sorted(linears)  # every linear, lm_head included
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj") in report.fused
    assert ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in report.fused
    assert len(report.fused) == 4  # q/k/v and gate/up in each of 2 layers; o_proj, down_proj unfused
    assert all(isinstance(m, PackedLinear) for n, m in fast.named_modules() if n in linears)
    assert "active" in str(report)
    assert fastpath.is_optimized(fast) and not fastpath.is_optimized(tiny)
    assert optimize_for_cpu(fast) is report  # idempotent


@needs_onednn
def test_each_weight_is_packed_once(tiny):
    """A fused group's members hold no packed copy of their own: one packed copy per weight."""
    fast, _ = _fast(tiny)
    packed: list[torch.Tensor] = []
    groups: dict[int, fastpath.FusedLinearGroup] = {}
    for module in fast.modules():
        if isinstance(module, PackedLinear):
            if module._group is not None:
                assert module._packed is None and module._packed_bias is None
                groups[id(module._group)] = module._group
            else:
                packed.append(module._packed)
    packed += [group._packed for group in groups.values()]
    linear_elements = sum(m.weight.numel() for m in tiny.modules() if isinstance(m, nn.Linear))
    assert sum(t.numel() for t in packed) == linear_elements


@needs_onednn
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_weights_mapped_from_a_file_are_released_and_stay_readable(tmp_path):
    """The fp32 originals the fast path packed are paged out of a file-mapped model, not lost."""
    from transformers import AutoModelForCausalLM

    _tiny(tie=True).save_pretrained(tmp_path)  # safetensors: loaded back by mmap
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
    report = optimize_for_cpu(model)
    assert report.active
    if not fastpath._file_mappings() or report.released == 0:
        pytest.skip("weights not file-mapped here or madvise(MADV_PAGEOUT) unsupported")
    linear = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, PackedLinear))
    assert 0 < report.released <= linear
    with torch.no_grad():
        _assert_close(model(ids).logits, reference, FP32_RTOL)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())  # read back from the file


@needs_onednn
def test_weights_built_in_memory_are_not_released(tiny):
    fast, report = _fast(tiny)
    assert report.released == 0


@needs_onednn
def test_state_dict_and_tied_weights_unchanged():
    model = _tiny(tie=True)
    keys = list(model.state_dict())
    fast, _ = _fast(model)
    assert list(fast.state_dict()) == keys
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    assert restore(fast) > 0
    assert all(type(m) is nn.Linear for m in fast.modules() if isinstance(m, nn.Linear))
    assert not fastpath.is_optimized(fast)


@needs_onednn
def test_include_lm_head_false_leaves_head_plain(tiny):
    fast, report = _fast(tiny, include_lm_head=False)
    assert type(fast.lm_head) is nn.Linear
    assert "lm_head" not in report.replaced
    assert any(s.startswith("lm_head") for s in report.skipped)
    assert report.lm_head_dtype is None


@needs_onednn
def test_layers_with_hooks_are_left_alone(tiny):
    model = copy.deepcopy(tiny)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    report = optimize_for_cpu(model)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert any(s.startswith("model.layers.0.mlp.down_proj") and "hooks" in s for s in report.skipped)
    with torch.inference_mode():
        model(_ids())
    assert seen  # the hook still runs


@needs_onednn
def test_deepcopy_and_save_of_optimised_model(tiny, tmp_path):
    ids = _ids()
    fast, _ = _fast(tiny)
    with torch.inference_mode():
        expected = fast(ids).logits
    clone = copy.deepcopy(fast)  # oneDNN's packed tensors cannot be copied: repacked lazily
    assert clone.model.layers[0].self_attn.q_proj._group is not fast.model.layers[0].self_attn.q_proj._group
    torch.save(fast, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.inference_mode():
        torch.testing.assert_close(clone(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------- numerics


@needs_onednn
@pytest.mark.parametrize("dtype, rtol", DTYPES_AND_TOLERANCES)
def test_logits_close_to_fp32(tiny, dtype, rtol):
    ids = _ids()
    fast, _ = _fast(tiny, dtype=dtype)
    with torch.inference_mode():
        _assert_close(fast(ids).logits, tiny(ids).logits, rtol)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_fused_equals_unfused(tiny, dtype):
    ids = _ids()
    fused, r1 = _fast(tiny, dtype=dtype)
    unfused, r2 = _fast(tiny, dtype=dtype, fuse=False)
    assert r1.fused and not r2.fused
    with torch.inference_mode():
        # Concatenating weights along the output dimension leaves each output's dot
        # product unchanged, so the results agree bit for bit.
        torch.testing.assert_close(fused(ids).logits, unfused(ids).logits, rtol=0, atol=0)


@needs_onednn
def test_fusion_exact_when_siblings_get_different_inputs():
    """Fusion must not assume the modelling code feeds every sibling the same input."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # k gets another tensor; v is called twice; q's input is modified in place.
            k = self.k_proj(x * 2)
            q = self.q_proj(x)
            v1 = self.v_proj(x)
            v2 = self.v_proj(x)
            return torch.cat([q, k, v1, v2], dim=-1)

    torch.manual_seed(0)
    odd = Odd().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = odd(x)
        fast, report = _fast(odd, dtype=torch.float32)
        assert report.fused == [("q_proj", "k_proj", "v_proj")]
        _assert_close(fast(x), expected, FP32_RTOL)
        # In-place change between two sibling calls with the same tensor object.
        y = x.clone()
        a = fast.q_proj(y)
        y.add_(1.0)
        _assert_close(fast.k_proj(y), odd.k_proj(y), FP32_RTOL)
        _assert_close(a, odd.q_proj(x), FP32_RTOL)


@needs_bf16
def test_dynamic_cache_step_by_step(tiny):
    from transformers import DynamicCache

    ids = _ids(batch=2, length=14)
    fast, _ = _fast(tiny, dtype=torch.bfloat16)
    with torch.inference_mode():
        full_ref = tiny(ids).logits
        full_fast = fast(ids).logits
        cache = DynamicCache(config=fast.config)
        steps = []
        out = fast(ids[:, :6], use_cache=True, **cache_kwargs(fast, cache))
        steps.append(out.logits)
        for t in range(6, ids.shape[1]):
            out = fast(ids[:, t : t + 1], use_cache=True, **cache_kwargs(fast, cache))
            steps.append(out.logits)
        cached_fast = torch.cat(steps, dim=1)
    assert cache.get_seq_length() == ids.shape[1]
    _assert_close(cached_fast, full_fast, BF16_RTOL)
    _assert_close(cached_fast, full_ref, BF16_RTOL)


@needs_onednn
@pytest.mark.parametrize("dtype, rtol", DTYPES_AND_TOLERANCES)
def test_left_padded_batch_matches_each_prompt_alone(tiny, dtype, rtol):
    from transformers import DynamicCache

    fast, _ = _fast(tiny, dtype=dtype)
    prompts = [_ids(1, 9, seed=2)[0], _ids(1, 4, seed=3)[0], _ids(1, 6, seed=4)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = 3
    with torch.inference_mode():
        cache = DynamicCache(config=fast.config)
        out = fast(ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(fast, cache))
        batched = [out.logits[:, -1]]
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            positions = positions[:, -1:] + 1
            out = fast(nxt, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(fast, cache))
            batched.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
        batched_tokens = torch.stack([b.argmax(-1) for b in batched], dim=1)
        for i, p in enumerate(prompts):
            # The same prompt alone, unpadded, fed the batch's tokens, with plain fp32.
            seq = torch.cat([p, batched_tokens[i, :steps]])[None]
            alone = tiny(seq).logits[0, len(p) - 1 :]
            _assert_close(torch.stack([b[i] for b in batched]), alone, rtol)


@needs_onednn
def test_repacks_after_weights_change(tiny):
    ids = _ids()
    fast, _ = _fast(tiny)
    other = _tiny(seed=5)
    with torch.inference_mode():
        before = fast(ids).logits
    fast.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after = fast(ids).logits
        expected = other(ids).logits
    assert not torch.allclose(before, after)
    _assert_close(after, expected, FP32_RTOL)


@needs_bf16
def test_autograd_falls_back_to_plain_linear(tiny):
    fast, _ = _fast(tiny, dtype=torch.bfloat16)
    ids = _ids(batch=1, length=5)
    fast.zero_grad()
    fast(ids).logits.sum().backward()
    grad = fast.model.layers[0].self_attn.k_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    ref = copy.deepcopy(tiny)
    ref(ids).logits.sum().backward()
    torch.testing.assert_close(grad, ref.model.layers[0].self_attn.k_proj.weight.grad)


# ----------------------------------------------------------------------- fallback


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, snapshot) -> None:
    types, state = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not fastpath.is_optimized(model)


def test_unsupported_leaves_model_untouched(tiny, monkeypatch):
    monkeypatch.setattr(fastpath, "is_supported", lambda dtype=torch.bfloat16: False)
    model = copy.deepcopy(tiny)
    snap = _snapshot(model)
    report = optimize_for_cpu(model)
    assert not report.active and report.reason.startswith("not applied")
    assert not report.replaced
    _assert_untouched(model, snap)


def test_failing_trial_matmul_leaves_model_untouched(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr(fastpath, "_pack", broken)
    model = copy.deepcopy(tiny)
    snap = _snapshot(model)
    report = optimize_for_cpu(model)
    assert not report.active
    assert "trial" in report.reason and "no oneDNN kernel" in report.reason
    _assert_untouched(model, snap)


def test_packing_failure_midway_leaves_model_untouched(tiny, monkeypatch):
    real = fastpath._pack
    calls = {"n": 0}

    def flaky(weight, dtype):
        calls["n"] += 1
        if calls["n"] > 3:  # the trial passes, a real layer fails
            raise RuntimeError("out of memory")
        return real(weight, dtype)

    monkeypatch.setattr(fastpath, "_pack", flaky)
    model = copy.deepcopy(tiny)
    snap = _snapshot(model)
    report = optimize_for_cpu(model)
    assert not report.active and "packing failed" in report.reason
    _assert_untouched(model, snap)


def test_not_applied_on_non_cpu_device(tiny):
    model = copy.deepcopy(tiny).to("meta")  # stands in for cuda, which CI lacks
    report = optimize_for_cpu(model)
    assert not report.active and report.reason == "not applied: model on meta"
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_unsupported_reason_is_none_or_text():
    for dtype in (torch.float32, torch.bfloat16):
        reason = fastpath.unsupported_reason(dtype)
        assert (reason is None) == fastpath.is_supported(dtype)
    assert "not supported" in fastpath.unsupported_reason(torch.float64)


# ----------------------------------------------------------------------- embedded


def _load_embedded():
    if os.environ.get("PREFALIGN_SKIP_EMBEDDED"):
        pytest.skip("PREFALIGN_SKIP_EMBEDDED is set")
    try:
        from prefalign.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        try:
            return load_model()
        except Exception as exc:  # e.g. the embedded package is not installed
            error = exc
    else:
        error = ImportError("prefalign.models not importable")
    if Path("/tmp/smol/config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained("/tmp/smol").eval(), AutoTokenizer.from_pretrained("/tmp/smol")
    pytest.skip(f"embedded model cannot be loaded: {error}")


def _prompts(tokenizer, n: int) -> list[str]:
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amulet" / "HelpSteer_train.json"
    if data.is_file():
        questions = [row["question"] for row in json.loads(data.read_text())[:n]]
    else:
        questions = ["What is the history of the bed?", "How does the ozone layer protect us?"][:n]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


def _greedy(model: nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    from transformers import DynamicCache

    tokens: list[int] = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(ids, use_cache=True, **cache_kwargs(model, cache))
        for _ in range(n):
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
            out = model(nxt, use_cache=True, **cache_kwargs(model, cache))
    return tokens


@pytest.mark.embedded
@needs_onednn
def test_embedded_default_keeps_greedy_tokens():
    model, tokenizer = _load_embedded()
    model.eval()
    fast, report = _fast(model)  # the defaults, as Aligner.from_pretrained uses them
    assert report.lm_head_dtype == torch.float32
    for prompt in _prompts(tokenizer, 2):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert _greedy(fast, ids, 32) == _greedy(model, ids, 32), prompt
