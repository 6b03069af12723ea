"""A real judged run: the embedded model's answers judged by the proxies and by local
instruct models served by `prefalign serve`'s app on loopback as pairwise LLM judges.

Takes the answers of docs/results/amulet (the embedded SmolLM2-135M-Instruct, Amulet's
template, 128 tokens, 12 prompts) for a few preferences and methods, copies them to
``--out`` and judges every method's answer against ``pref``'s with each judge model, in
both orders (Amulet's prompt), then writes the report with the judges' agreement.

    python benchmarks/judge_real_run.py \\
        --judge-model qwen2.5-coder-1.5b=/root/.cache/prefalign/converted/qwen2.5-coder-... \\
        --judge-model smollm2-135m=embedded

A judge model whose directory is missing is reported as not installed and skipped.
Resumable: rerunning continues from the judges' caches in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "results" / "amulet"


def _subset(out: Path, preferences: list[str], variants: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.jsonl").is_file():
        return  # resume: keep the rows (and their verdicts)
    rows = [json.loads(line) for line in (SOURCE / "results.jsonl").read_text().splitlines() if line.strip()]
    keep = [r for r in rows if r["preference"] in preferences and r["variant"] in variants]
    (out / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
    config = json.loads((SOURCE / "config.json").read_text())
    config["subset_of"] = {"source": str(SOURCE.relative_to(ROOT)), "preferences": preferences, "variants": variants}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _serve(aligner, name: str, port: int):
    import uvicorn

    from prefalign.server import create_app

    app = create_app(aligner, model_id=name, default_method="base", max_batch=4)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))  # a fixed port: the judge's name (and its cache) includes it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge-model", action="append", required=True, help="NAME=PATH (or NAME=embedded)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "judges-amulet"))
    parser.add_argument("--preferences", default="amulet:concise,amulet:verbose,amulet:formal,amulet:pleasant")
    parser.add_argument("--variants", default="base,pref,la,amulet")
    parser.add_argument("--methods", default="base,amulet", help="variants judged against pref")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--port", type=int, default=18011, help="first loopback port (one per judge model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", help="judge weights (bfloat16 halves the memory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from prefalign import Aligner
    from prefalign.eval.judging import build_judges, judge_run
    from prefalign.eval.report import write_report

    out = Path(args.out)
    _subset(out, args.preferences.split(","), args.variants.split(","))
    notes = []
    for i, spec in enumerate(args.judge_model):
        name, _, path = spec.partition("=")
        if path != "embedded" and not Path(path).is_dir():
            notes.append(f"{name}: not installed ({path} missing); skipped")
            print(notes[-1], flush=True)
            continue
        t0 = time.perf_counter()
        aligner = Aligner.from_pretrained(None if path == "embedded" else path, fast=False, threads=args.threads,
                                          dtype=None if path == "embedded" else args.dtype)
        load_s = time.perf_counter() - t0
        server, thread, url = _serve(aligner, name, args.port + i)
        try:
            [judge] = build_judges([f"llm:{url},vs=pref,methods={args.methods.replace(',', '+')},concurrency={args.concurrency},timeout=600"], models=[name])
            [s] = judge_run(out, [judge], progress=True)
            notes.append(f"{name}: {s.judged} pairs judged now ({s.cached} cached) in {s.seconds:.0f} s, "
                         f"{s.calls} calls, {s.malformed} malformed, {s.errors} failed; model load {load_s:.0f} s")
            print(notes[-1], flush=True)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            del aligner
    (out / "run_notes.json").write_text(json.dumps({"notes": notes, "date": time.strftime("%Y-%m-%d"),
                                                    "threads": args.threads, "dtype": args.dtype}, indent=2) + "\n")
    print(write_report(out, title="Judges compared: the embedded model's Amulet answers"))


if __name__ == "__main__":
    main()
