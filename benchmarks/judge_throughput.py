"""Judging throughput: answers (or pairs) per minute for each judge kind.

Judges N answers of the embedded model from docs/results/amulet (base, pref, amulet
under one preference) with:

- ``proxy``: the preference's offline judge (what `prefalign eval` computes per row);
- ``rm`` on random-weight sequence-classification models: a tiny Llama (2 layers, width
  64: the harness's own overhead) and a GPT-2-small-shaped one (124M parameters, the
  compute of a small real reward model), batch 8;
- ``llm`` against a stub OpenAI-compatible server that answers at once (the harness's
  overhead: prompts, HTTP, cache), and against `prefalign serve` on loopback with the
  embedded SmolLM2-135M as the judge (a real model's cost), both orders per pair.

    python benchmarks/judge_throughput.py            # N=24 answers
    python benchmarks/judge_throughput.py --n 6      # smoke run

Random weights score nonsense: these numbers are speed, not quality. Prints a table and
writes benchmarks/results/judge_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "results" / "amulet" / "results.jsonl"
OUT = ROOT / "benchmarks" / "results" / "judge_throughput.json"
sys.path.insert(0, str(ROOT / "tests"))


def _subset(n: int, preference: str) -> list[dict]:
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["preference"] == preference and r["variant"] in ("base", "pref", "amulet")]
    prompts = sorted({(r["dataset"], r["prompt_id"]) for r in rows})[: max(1, n // 3)]
    keep = [r for r in rows if (r["dataset"], r["prompt_id"]) in prompts]
    for r in keep:
        r.pop("judged", None)
    return keep


def _run_dir(rows: list[dict]) -> tempfile.TemporaryDirectory:
    tmp = tempfile.TemporaryDirectory()
    d = Path(tmp.name)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.json").write_text(json.dumps({"settings": {"model": "embedded"}, "runs": []}))
    return tmp


def _rm_dir(tokenizer, kind: str, root: Path) -> str:
    torch.manual_seed(0)
    if kind == "tiny-llama":
        from transformers import LlamaConfig, LlamaForSequenceClassification

        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
        model = LlamaForSequenceClassification(cfg)
    else:
        from transformers import GPT2Config, GPT2ForSequenceClassification

        cfg = GPT2Config(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2ForSequenceClassification(cfg)  # GPT-2 small shape
    path = root / kind
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _time_judge(rows: list[dict], judge) -> dict:
    from prefalign.eval.judging import judge_run

    with _run_dir(rows) as d:
        [s] = judge_run(d, [judge], progress=False)
    unit = "answers" if s.kind == "rm" else "pairs"
    out = {"judge": s.name, "kind": s.kind, unit: s.judged, "seconds": round(s.seconds, 2),
           f"{unit}_per_min": round(s.per_minute, 1)}
    if s.kind == "llm":
        out["calls"] = s.calls
        out["calls_per_min"] = round(60 * s.calls / s.seconds, 1) if s.seconds else None
        out["malformed"] = s.malformed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24, help="answers (a multiple of 3: base, pref, amulet per prompt)")
    parser.add_argument("--preference", default="amulet:concise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--skip-serve", action="store_true", help="no prefalign-serve judge")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from judge_helpers import Stub

    from prefalign.eval.judges import judges_for
    from prefalign.eval.judging import build_judges
    from prefalign.eval.runner import package_versions
    from prefalign.models import load_tokenizer

    rows = _subset(args.n, args.preference)
    results = []

    judges = judges_for(args.preference)
    start = time.perf_counter()
    for r in rows:
        for j in judges:
            j.details(r["text"], prompt=r["prompt"])
    wall = time.perf_counter() - start
    results.append({"judge": "proxy (" + "+".join(j.name for j in judges) + ")", "kind": "proxy",
                    "answers": len(rows), "seconds": round(wall, 3), "answers_per_min": round(60 * len(rows) / wall, 1)})

    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as models:
        for kind in ("tiny-llama", "gpt2-small"):
            path = _rm_dir(tokenizer, kind, Path(models))
            [judge] = build_judges([f"rm:{path},batch=8"])
            res = _time_judge(rows, judge)
            res["judge"] = f"rm: random {kind} ({sum(p.numel() for p in judge.model.parameters()) / 1e6:.0f}M params), batch 8"
            results.append(res)

    with Stub() as stub:
        [judge] = build_judges([f"llm:{stub.url},concurrency={args.concurrency},vs=pref"], models=["stub"])
        res = _time_judge(rows, judge)
        res["judge"] = f"llm: instant stub server, both orders, concurrency {args.concurrency}"
        results.append(res)

    if not args.skip_serve:
        import uvicorn

        from prefalign import Aligner
        from prefalign.server import create_app

        aligner = Aligner.from_pretrained(threads=args.threads)
        app = create_app(aligner, model_id="smollm2", default_method="base")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
            for conc in sorted({1, args.concurrency}):
                [judge] = build_judges([f"llm:{url},concurrency={conc},vs=pref,reask=0"], models=["smollm2"])
                res = _time_judge(rows, judge)
                res["judge"] = f"llm: prefalign serve, embedded SmolLM2-135M, both orders, concurrency {conc}"
                results.append(res)
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    report = {
        "benchmark": "judge_throughput",
        "answers": len(rows), "preference": args.preference, "source": str(SOURCE.relative_to(ROOT)),
        "threads": args.threads, "results": results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
                    "note": "CPU shared with other processes; random-weight reward models: speed only"},
        "versions": package_versions(["openai", "httpx"]),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"judge throughput: {len(rows)} answers ({args.preference}), {args.threads} thread(s)")
    for r in results:
        rate = r.get("answers_per_min") or r.get("pairs_per_min")
        unit = "answers/min" if "answers_per_min" in r else "pairs/min"
        print(f"- {r['judge']}: {rate} {unit}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
