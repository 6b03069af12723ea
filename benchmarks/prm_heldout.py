"""Re-measure a trained PRM's held-out reward accuracy from its saved files.

Loads the PRM as decoding will (``load_prm``: fp16 files, adapters merged, fp32
inference, no autocast), rebuilds the train/held-out split of its training pairs with
the seed and share recorded in ``prm_config.json``, and reports DPO reward accuracy
(ties count half) and mean margin on the held-out pairs, overall and per preference,
for the trained PRM and for the untrained one (= the policy; margins exactly 0).

    python benchmarks/prm_heldout.py                       # the shipped PRM
    python benchmarks/prm_heldout.py --prm out/prm --pairs pairs.jsonl --model embedded

The shipped PRM's pairs are ``train_pairs.jsonl.gz`` beside its weights.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prm", default=None, help="PRM directory (default: the shipped one)")
    parser.add_argument("--pairs", default=None, help="pairs JSONL(.gz) (default: the PRM's train_pairs.jsonl.gz)")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--limit", type=int, default=0, help="evaluate at most this many held-out pairs (0 = all)")
    parser.add_argument("--no-merge", action="store_true", help="keep LoRA unmerged")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from prefalign.models import load_model
    from prefalign.prm import default_prm_path, load_prm
    from prefalign.prm.data import encode_pairs, load_pair_rows, split_pairs
    from prefalign.prm.io import read_prm_config
    from prefalign.prm.train import _summarise, pair_logps

    prm_dir = Path(args.prm) if args.prm else default_prm_path()
    config = read_prm_config(prm_dir)
    training = config.get("extra", {}).get("training", {})
    hp = training.get("hyperparameters", {})
    pairs = Path(args.pairs) if args.pairs else prm_dir / "train_pairs.jsonl.gz"
    tmp = None
    if pairs.suffix == ".gz":
        tmp = Path(tempfile.mkdtemp())
        with gzip.open(pairs, "rb") as src, (tmp / "pairs.jsonl").open("wb") as dst:
            shutil.copyfileobj(src, dst)
        pairs = tmp / "pairs.jsonl"
    try:
        policy, tokenizer = load_model(args.model)
        rows = load_pair_rows(pairs)
        examples, _ = encode_pairs(
            rows, tokenizer, template=str(hp.get("template", config.get("template", "pad"))),
            max_prompt_tokens=int(hp.get("max_prompt_tokens", 160)),
            max_answer_tokens=int(hp.get("max_answer_tokens", 96)),
        )
        _, held_out = split_pairs(examples, float(hp.get("held_out", 0.1)), int(hp.get("seed", 0)))
        if args.limit:
            held_out = held_out[: args.limit]
        prm = load_prm(prm_dir, policy, tokenizer, merge=not args.no_merge)
        beta = float(hp.get("beta", 0.1))
        pad = tokenizer.pad_token_id or 0
        t0 = time.monotonic()
        margins = []
        with torch.no_grad():
            for i, e in enumerate(held_out, 1):
                c, r = pair_logps(prm, [e], pad_id=pad, bf16=False)
                # The reference is the policy itself.
                ids_c = torch.tensor([e.prompt_ids + e.chosen_ids])
                ids_r = torch.tensor([e.prompt_ids + e.rejected_ids])
                ref = []
                for ids, ans in ((ids_c, e.chosen_ids), (ids_r, e.rejected_ids)):
                    logp = torch.log_softmax(policy(input_ids=ids).logits[0, len(e.prompt_ids) - 1 : -1].float(), -1)
                    ref.append(logp.gather(-1, torch.tensor(ans)[:, None]).sum().item())
                margins.append((e.preference, beta * ((c.item() - ref[0]) - (r.item() - ref[1]))))
                print(f"\r{i}/{len(held_out)} pairs", end="", file=sys.stderr)
        print(file=sys.stderr)
        result = {
            "prm": str(prm_dir),
            "merged": not args.no_merge,
            "held_out_pairs": len(held_out),
            "untrained": _summarise([(p, 0.0) for p, _ in margins]),
            "trained": _summarise(margins),
            "seconds": round(time.monotonic() - t0, 1),
        }
        print(json.dumps(result, indent=1))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
