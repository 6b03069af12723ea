"""PAD decoding speed on the embedded model: time per token vs base, and vs an uncached loop.

    .venv/bin/python benchmarks/pad_speed.py                # fast path on (as Aligner.from_pretrained)
    .venv/bin/python benchmarks/pad_speed.py --no-fast      # plain fp32 PyTorch
    .venv/bin/python benchmarks/pad_speed.py --quick        # 16 tokens, one repeat (smoke run)

Configurations, all greedy with forced tokens (``ignore_eos``) so each decodes the same
number of steps, on the same prompts, through prefalign's batched KV-cached engine:

* ``base``: the policy alone on PAD's prompt (method ``pref``, template ``pad``): what
  PAD decodes when the reward is zero, one forward per step.
* ``pad, one pass (fused)`` — the default (``Aligner.load_prm``): the shipped PRM (else
  a freshly built identity PRM: the cost is the same) with unmerged LoRA adapters,
  run in the same forward as the policy (:mod:`prefalign.pad_fused`): the policy's
  weights compute every row, the adapters and the linear layer touch the PRM's rows only.
* ``pad, two passes (merged PRM)``: the same PRM with its adapters merged into its own
  weights, as a second model; per step one cached forward of the policy and one of the
  PRM (``load_prm(..., fused=False)``).
* ``pad, two passes (LoRA PRM)``: the same PRM with the adapters left unmerged.
* ``pad, one module, adapters toggled``: a single PRM module serves both keys, with
  adapters switched off for the policy's pass (``PersonalizedRewardModel.adapters_disabled``)
  and on for the PRM's pass: one set of weights in memory, still two passes.
* ``uncached reference``: the papers' loop (:mod:`prefalign.reference`): every step
  re-encodes each context's whole sequence, no KV cache (the official PAD code does
  this, one prompt at a time), for base and for PAD.

Each (configuration, batch) is repeated and the fastest run kept; repeats are
interleaved across configurations so that load from other processes spreads evenly.
"ms/token" is wall time per decoding step (one token for every prompt of the batch),
prefill included; "decode ms/step" leaves out the first step (prefill).
Writes ``benchmarks/results/pad_speed.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prefalign import Aligner  # noqa: E402
from prefalign.methods import PRM  # noqa: E402
from prefalign.models import load_model  # noqa: E402
from prefalign.reference import reference_generate  # noqa: E402

PROMPTS = [
    "How do I boil an egg?",
    "Write a short poem about the sea and the wind over the harbour at dawn.",
    "What is the capital of France, and what is it famous for?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis.",
    "Why is the sky blue? Explain the physics step by step, mentioning Rayleigh scattering.",
    "What should I cook tonight with rice, beans and tomatoes?",
    "Summarise the plot of Hamlet in a few sentences.",
]
PREFERENCE = "pad:helpful+harmless"
CANDIDATES_DEFAULT = "pad, fused, candidates from default template"


class _AdaptersOff(torch.nn.Module):
    """The policy's pass through the PRM module with its adapters switched off."""

    def __init__(self, prm: Any) -> None:
        super().__init__()
        self.prm = prm
        self.config = prm.config

    def forward(self, **kwargs: Any) -> Any:
        with self.prm.adapters_disabled():
            return self.prm(**kwargs)


def _build_prms(policy: Any, tokenizer: Any) -> tuple[Any, Any, str]:
    """(merged PRM, unmerged PRM, where they came from); (deep copy, None, ...) without prefalign.prm."""
    try:
        from prefalign import prm as prm_api
    except ImportError:
        import copy

        return copy.deepcopy(policy), None, "deep copy of the policy (prefalign.prm not available)"
    try:
        path = prm_api.default_prm_path()
        merged = prm_api.load_prm(path, policy, tokenizer, merge=True)
        unmerged = prm_api.load_prm(path, policy, tokenizer, merge=False)
        return merged, unmerged, f"shipped PRM ({path.name})"
    except Exception as exc:  # not shipped: an identity PRM of the shipped layout costs the same per step
        n_layers = int(policy.config.num_hidden_layers)
        top = list(range(max(0, n_layers - 10), n_layers))
        merged = prm_api.build_prm(policy, layers=top)
        merged.merge_adapters()
        unmerged = prm_api.build_prm(policy, layers=top)
        for p in list(merged.parameters()) + list(unmerged.parameters()):
            p.requires_grad_(False)
        return merged.eval(), unmerged.eval(), f"identity PRM, LoRA r=8 on the top 10 blocks, untrained (no shipped PRM: {exc})"


def _timed_generate(aligner: Aligner, prompts: list[str], method: str, n_tokens: int, **kwargs: Any) -> tuple[float, float, list[list[int]]]:
    """(total seconds, seconds of the steps after the first, tokens) for one batch."""
    engine = aligner.engine
    requests = [aligner.build_request(p, PREFERENCE, method, max_new_tokens=n_tokens, ignore_eos=True, **kwargs) for p in prompts]
    for r in requests:
        engine.add(r)
    start = time.perf_counter()
    engine.step()
    after_first = time.perf_counter()
    while engine.has_work:
        engine.step()
    end = time.perf_counter()
    tokens = [engine.pop_result(r.request_id).token_ids for r in requests]
    return end - start, end - after_first, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=128, help="128: the official PAD scripts' max_new_token")
    parser.add_argument("--reference-tokens", type=int, default=32, help="tokens for the (slow) uncached loop")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-fast", action="store_true", help="plain fp32 PyTorch instead of the CPU fast path")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only these configurations (base always runs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pad_speed.json"))
    args = parser.parse_args()
    if args.quick:
        args.max_new_tokens, args.reference_tokens, args.repeats = 16, 8, 1
    torch.set_num_threads(args.threads)

    policy, tokenizer = load_model()
    merged, unmerged, prm_source = _build_prms(policy, tokenizer)
    fast_report = "off"
    if not args.no_fast:
        from prefalign import fastpath

        fast_report = str(fastpath.optimize_for_cpu(policy))
        for m in (merged, unmerged):
            if m is not None:
                fastpath.optimize_for_cpu(m)
    print(f"PRM: {prm_source}\nfast path: {fast_report}", flush=True)

    # name → (aligner, method, generate kwargs); "base" is the policy alone on PAD's prompt.
    aligners: dict[str, tuple[Aligner, str, dict[str, Any]]] = {}
    base = Aligner(policy, tokenizer)
    aligners["base"] = (base, "pref", {"template": "pad"})
    if unmerged is not None:
        from prefalign.pad_fused import FusedPadModel

        fused = Aligner(policy, tokenizer)
        fused.add_model(PRM, FusedPadModel(policy, unmerged))
        aligners["pad, one pass (fused)"] = (fused, "pad", {})
        # A different rule (a third context proposes the candidates): its own tokens.
        aligners[CANDIDATES_DEFAULT] = (fused, "pad", {"candidate_template": "default"})
    two = Aligner(policy, tokenizer)
    two.add_model(PRM, merged)
    aligners["pad, two passes (merged PRM)"] = (two, "pad", {})
    if unmerged is not None:
        lora = Aligner(policy, tokenizer)
        lora.add_model(PRM, unmerged)
        aligners["pad, two passes (LoRA PRM)"] = (lora, "pad", {})
        toggled = Aligner(policy, tokenizer)
        toggled.engine.models["policy"] = _AdaptersOff(unmerged)
        toggled.add_model(PRM, unmerged)
        aligners["pad, one module, adapters toggled"] = (toggled, "pad", {})

    if args.only:
        aligners = {k: v for k, v in aligners.items() if k == "base" or any(o in k for o in args.only)}
    rows: list[dict[str, Any]] = []
    tokens_seen: dict[tuple[str, int], list[list[int]]] = {}
    for batch in args.batch:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        for name, (al, method, kwargs) in aligners.items():  # warm-up
            _timed_generate(al, prompts, method, 3, **kwargs)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for name, (al, method, kwargs) in aligners.items():
                total, decode, toks = _timed_generate(al, prompts, method, args.max_new_tokens, **kwargs)
                tokens_seen[(name, batch)] = toks
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], total), min(old[1], decode))
                print(f"  batch {batch} {name:<36} {1000 * total / args.max_new_tokens:8.1f} ms/token", flush=True)
        for name, (total, decode) in best.items():
            rows.append({
                "config": name, "batch": batch, "tokens": args.max_new_tokens,
                "ms_per_token": round(1000 * total / args.max_new_tokens, 2),
                "decode_ms_per_step": round(1000 * decode / (args.max_new_tokens - 1), 2),
                "tokens_per_s": round(batch * args.max_new_tokens / total, 2),
            })
        # The uncached loop: whole sequences re-encoded every step (fewer tokens: it is slow).
        for name, al, method in (("uncached reference, base", base, "pref"), ("uncached reference, pad", two, "pad")):
            kwargs = {"template": "pad"} if method == "pref" else {}
            requests = [al.build_request(p, PREFERENCE, method, max_new_tokens=args.reference_tokens, ignore_eos=True, **kwargs) for p in prompts]
            start = time.perf_counter()
            reference_generate(al.engine.models, requests, [], tokenizer.pad_token_id)
            total = time.perf_counter() - start
            rows.append({
                "config": name, "batch": batch, "tokens": args.reference_tokens,
                "ms_per_token": round(1000 * total / args.reference_tokens, 2), "decode_ms_per_step": None,
                "tokens_per_s": round(batch * args.reference_tokens / total, 2),
            })
            print(f"  batch {batch} {name:<36} {1000 * total / args.reference_tokens:8.1f} ms/token", flush=True)

    def ms(config: str, batch: int) -> float:
        return next(r["ms_per_token"] for r in rows if r["config"] == config and r["batch"] == batch)

    ratios: dict[str, float] = {}
    for batch in args.batch:
        for r in rows:
            if r["batch"] == batch and r["config"] != "base":
                r["time_over_base"] = round(r["ms_per_token"] / ms("base", batch), 3)
        default = "pad, one pass (fused)" if any(r["config"] == "pad, one pass (fused)" for r in rows) else "pad, two passes (merged PRM)"
        ratios[f"pad_over_base_b{batch}"] = round(ms(default, batch) / ms("base", batch), 3)
        if default != "pad, two passes (merged PRM)" and any(r["config"] == "pad, two passes (merged PRM)" for r in rows):
            ratios[f"pad_two_passes_over_base_b{batch}"] = round(ms("pad, two passes (merged PRM)", batch) / ms("base", batch), 3)
        if any(r["config"] == CANDIDATES_DEFAULT for r in rows):
            ratios[f"pad_default_candidates_over_base_b{batch}"] = round(ms(CANDIDATES_DEFAULT, batch) / ms("base", batch), 3)
        ratios[f"uncached_pad_over_pad_b{batch}"] = round(ms("uncached reference, pad", batch) / ms(default, batch), 3)
        ratios[f"uncached_pad_over_uncached_base_b{batch}"] = round(
            ms("uncached reference, pad", batch) / ms("uncached reference, base", batch), 3)
    def agreement(reference: str) -> dict[str, str]:
        """Per PAD configuration and batch: prompts whose tokens equal ``reference``'s."""
        return {
            f"{name} b{b}": f"{sum(x == y for x, y in zip(tokens_seen[(reference, b)], tokens_seen[(name, b)]))}/{b}"
            for b in args.batch for name in aligners if name not in ("base", reference, CANDIDATES_DEFAULT)
        }

    same = agreement("base")
    same_as_fused = agreement("pad, one pass (fused)") if "pad, one pass (fused)" in aligners else {}
    results = {
        "model": "SmolLM2-135M-Instruct (embedded)",
        "prm": prm_source,
        "preference": PREFERENCE,
        "fast_path": fast_report,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "reference_tokens": args.reference_tokens,
        "repeats": args.repeats,
        # With an identity PRM the reward is zero and PAD must decode base's tokens.
        "pad_tokens_equal_base": same,
        # Every PAD configuration runs the same PRM: the tokens must agree with the default's.
        "pad_tokens_equal_fused": same_as_fused,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
        "ratios": ratios,
        "quick": args.quick,
    }
    print()
    print(markdown_table(results))
    for key, value in ratios.items():
        print(f"{key}: {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}")


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        f"PAD decoding speed, {results['model']}, {results['threads']} thread(s), fast path: "
        f"{'off' if results['fast_path'] == 'off' else 'on'}; PRM: {results['prm'].split(' (')[0]}",
        "",
        "| configuration | batch | ms/token | decode ms/step | tokens/s | × base |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        decode = "–" if r["decode_ms_per_step"] is None else f"{r['decode_ms_per_step']:.1f}"
        ratio = "1.00" if r["config"] == "base" else f"{r.get('time_over_base', float('nan')):.2f}"
        lines.append(f"| {r['config']} | {r['batch']} | {r['ms_per_token']:.1f} | {decode} | {r['tokens_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
