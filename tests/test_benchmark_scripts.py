"""The GPU speed script runs unchanged on the CPU with a small shape (how it is tested here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_speed_runs_on_the_cpu_with_a_tiny_shape(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = _load("gpu_speed").main([
            "--shape", "tiny", "--device", "cpu", "--batch", "1", "--batch", "2", "--tokens", "4", "--repeats", "1",
            "--out", str(tmp_path / "gpu.json"),
        ])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["device"] == "cpu" and saved["static_compiled"] is False
    assert [row["batch"] for row in saved["rows"]] == [1, 2]
    for row in saved["rows"]:
        assert all(row[f"{m}_ms"] > 0 for m in ("base", "amulet", "pad", "transformers_static", "transformers_dynamic"))
        assert row["base_equals_transformers"] == row["batch"]  # greedy base = transformers' greedy tokens
    assert result["rows"] == saved["rows"]
