"""prefalign: personalised alignment of language models at decoding time.

Amulet, PAD, Linear Alignment and the papers' baselines on any Hugging Face causal LM,
batched and KV-cached, from Python, the command line or an OpenAI-compatible server.
"""

from __future__ import annotations

import os

# OpenMP worker threads that busy-wait collapse (10-50x slower) when another process
# shares the CPU; passive waiting avoids it. Only effective before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .aligner import Aligner, StreamEvent
from .engine import Delta, Engine, GenerationRequest, GenerationResult, SamplingParams, TokenLogprob, Usage
from .errors import PrefalignError
from .methods import METHODS, Method, make_method
from .prompts import PRESETS, Preference

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "PRESETS",
    "Aligner",
    "Delta",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "Method",
    "Preference",
    "PrefalignError",
    "SamplingParams",
    "StreamEvent",
    "TokenLogprob",
    "Usage",
    "__version__",
    "make_method",
]
