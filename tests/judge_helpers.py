"""Helpers shared by the judge tests: a results directory as `prefalign eval` writes it."""

from __future__ import annotations

import json
from pathlib import Path


def make_run(directory: Path, answers: dict[str, list[str]], preference: str = "amulet:concise") -> Path:
    """A results directory as `prefalign eval` writes it: one row per prompt × variant."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant, texts in answers.items():
        for i, text in enumerate(texts):
            rows.append({
                "dataset": "toy", "prompt_id": f"p{i}", "prompt": f"Question {i}?", "preference": preference,
                "preference_text": "Your answer should be concise as much as possible.",
                "method": variant, "variant": variant, "sweep": {}, "params": {}, "template": "amulet",
                "text": text, "completion_tokens": len(text.split()), "finish_reason": "stop", "seconds": 1.0,
                "forward_passes": 5, "judge": "length_words", "direction": -1, "score": float(len(text.split())),
                "guards": {"perplexity": 5.0, "repetition_4": 0.0, "non_dictionary_share": 0.0, "words": len(text.split())},
                "generation": f"{variant}-{i}", "shared": False,
                "batch": {"id": f"b-{variant}", "plan": f"b-{variant}", "size": 4, "elapsed": 1.0}, "time": "t",
            })
    with (directory / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (directory / "config.json").write_text(json.dumps({"settings": {"model": "toy"}, "runs": []}))
    return directory
