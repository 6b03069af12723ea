"""Decode-speed benchmark on the embedded model; same as `prefalign bench`.

    python benchmarks/decode_speed.py            # full run: batch 1 and 8, 128 forced tokens
    python benchmarks/decode_speed.py --quick    # smoke run

Writes benchmarks/results/decode_speed.json and the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

from prefalign.bench import run_decode_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1 and 8)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run_decode_benchmark(
        max_new_tokens=args.max_new_tokens,
        batch_sizes=args.batch or [1, 8],
        quick=args.quick,
        threads=args.threads,
        markdown="docs/benchmarks.md",
    )
