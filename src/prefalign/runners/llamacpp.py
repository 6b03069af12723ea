"""The llama.cpp backend: GGUF weights in llama.cpp's own quantized kernels.

:class:`LlamaCppModel` loads a GGUF with ``llama-cpp-python``'s low-level API (one
``llama_context`` whose KV memory holds many sequences) and brings its own runner,
:class:`LlamaCppRunner`: every engine row is one llama.cpp *sequence*; a prefill adds the
new rows' prompt tokens to one ``llama_batch`` with their sequence ids (in chunks of at
most the step's budget and ``n_batch`` tokens), a decode step sends one token per running
row in one batch and reads every row's logits; rows that leave have their sequence
removed (``llama_memory_seq_rm``), and a beam that forks copies its parent's sequence
(``llama_memory_seq_cp``). Positions are per sequence, so nothing is padded.

Methods are unchanged: the engine combines the rows' log-softmaxes exactly as on the
transformers backend. Tokens differ from the fp32 transformers path (quantized kernels).
PAD needs the PRM's LoRA adapters and linear layer on a torch backbone, so it is refused
here with a clear error (use the transformers backend).

Install: ``pip install 'prefalign[llamacpp]'`` (builds llama.cpp from source; about 10
minutes on 2 cores).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..errors import ModelLoadError, PrefalignError
from ..gguf_cache import existing_gguf
from .forward import to_logprobs

#: Sequences one context can hold (llama.cpp's own ceiling is 256).
DEFAULT_MAX_SEQUENCES = 64
#: ggml's log level for errors (the only messages shown).
GGML_LOG_LEVEL_ERROR = 3
#: KV cells shared by all sequences (kv_unified): enough for 64 rows of ~250 tokens.
DEFAULT_CONTEXT_TOKENS = 16384


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelLoadError(
            "the llama.cpp backend needs llama-cpp-python: install it with `pip install 'prefalign[llamacpp]'` "
            f"(it builds llama.cpp from source, about 10 minutes on 2 cores) ({exc})",
            field="backend",
        ) from exc
    return llama_cpp


@functools.cache
def _quiet(lib: Any) -> None:
    """Route llama.cpp's own logging (hundreds of lines per load) to nowhere but errors."""

    @lib.llama_log_callback
    def log(level: int, text: bytes, user_data: Any) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _quiet.callback = log  # keep the ctypes callback alive
    lib.llama_log_set(log, ctypes.c_void_p(0))


class LlamaCppModel:
    """A GGUF model in llama.cpp, shaped enough like a transformers model for the engine.

    ``config.max_position_embeddings`` (the training context), ``config.name_or_path``,
    ``generation_config.eos_token_id`` (the vocabulary's end-of-generation tokens) and
    ``make_runner`` are what the engine and :class:`~prefalign.Aligner` read.
    """

    backend = "llamacpp"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        n_ctx: int = DEFAULT_CONTEXT_TOKENS,
        max_sequences: int = DEFAULT_MAX_SEQUENCES,
        n_batch: int = 512,
        flash_attn: bool = False,
    ) -> None:
        lib = _import_llama_cpp()
        self.lib = lib
        path = existing_gguf(Path(path).expanduser())
        _quiet(lib)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ModelLoadError(f"llama.cpp cannot load {path}", field="model")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = max_sequences
        ctx_params.kv_unified = True  # one pool of KV cells for all sequences
        # llama-cpp-python's default (its Llama class), so tokens match plain llama.cpp use.
        ctx_params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        n_threads = threads or torch.get_num_threads()
        ctx_params.n_threads = n_threads
        ctx_params.n_threads_batch = n_threads
        self._ctx = lib.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp cannot create a context for {path} (n_ctx={n_ctx})", field="model")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        self.max_sequences = int(lib.llama_n_seq_max(self._ctx))
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.n_batch = int(lib.llama_n_batch(self._ctx))
        self.path = path
        eog = [t for t in range(self.vocab_size) if lib.llama_vocab_is_eog(self._vocab, t)]
        self.config = SimpleNamespace(
            name_or_path=f"{path.name} (llama.cpp)",
            max_position_embeddings=int(lib.llama_model_n_ctx_train(self._model)),
            vocab_size=self.vocab_size,
        )
        self.generation_config = SimpleNamespace(eos_token_id=eog)
        self.device = torch.device("cpu")
        self._runner: LlamaCppRunner | None = None

    @property
    def memory(self) -> Any:
        return self.lib.llama_get_memory(self._ctx)

    def set_threads(self, threads: int) -> None:
        """Threads for decoding and prompt processing."""
        self.lib.llama_set_n_threads(self._ctx, threads, threads)

    def make_runner(self, pad_token_id: int) -> LlamaCppRunner:
        """A runner over this context's KV memory (cleared: one engine owns a context)."""
        self.lib.llama_memory_clear(self.memory, True)
        self._runner = LlamaCppRunner(self)
        return self._runner

    def decode_batch(self, tokens: list[int], positions: list[int], seqs: list[int], outputs: list[bool]) -> torch.Tensor | None:
        """One ``llama_decode`` call; the log-softmax of the rows marked in ``outputs``, in order."""
        lib = self.lib
        n = len(tokens)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, (token, pos, seq, out) in enumerate(zip(tokens, positions, seqs, outputs)):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if out else 0
            batch.n_tokens = n
            status = lib.llama_decode(self._ctx, batch)
            if status != 0:
                raise PrefalignError(
                    f"llama.cpp could not decode a batch of {n} tokens (status {status}): the KV memory "
                    f"({self.n_ctx} tokens for all rows) is full; use fewer or shorter requests, or a larger n_ctx",
                    field="prompt",
                )
            count = sum(outputs)
            if not count:
                return None
            logits = lib.llama_get_logits(self._ctx)
            array = np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), shape=(count, self.vocab_size))
            return to_logprobs(torch.from_numpy(array.copy()))
        finally:
            lib.llama_batch_free(batch)

    def mean_nll(self, ids: list[int], start: int) -> float:
        """Mean negative log-likelihood of ``ids[start:]`` given what precedes each token
        (for perplexity), on a sequence of its own, removed afterwards."""
        runner = self._runner
        seq = runner._take() if runner is not None else 0
        try:
            total = 0.0
            for begin in range(0, len(ids), self.n_batch):
                chunk = ids[begin : begin + self.n_batch]
                positions = list(range(begin, begin + len(chunk)))
                outputs = [start - 1 <= p < len(ids) - 1 for p in positions]
                logprobs = self.decode_batch(chunk, positions, [seq] * len(chunk), outputs)
                if logprobs is None:
                    continue
                targets = [ids[p + 1] for p, out in zip(positions, outputs) if out]
                total -= float(logprobs[torch.arange(len(targets)), torch.tensor(targets)].sum())
            return total / (len(ids) - start)
        finally:
            if runner is not None:
                runner._release(seq)
            else:
                self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def close(self) -> None:
        """Free the context and the weights (also done when the object is collected)."""
        if getattr(self, "_ctx", None):
            self.lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self.lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"LlamaCppModel({str(self.path)!r}, n_ctx={self.n_ctx}, sequences={self.max_sequences})"


@dataclass
class SequencePrefill:
    """New rows being prefilled: each its own llama.cpp sequence."""

    seqs: list[list[int]]
    seq_ids: list[int]
    done: list[int]
    runner: LlamaCppRunner
    rows_logprobs: dict[int, torch.Tensor] = field(default_factory=dict)
    logprobs: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return all(d >= len(s) for d, s in zip(self.done, self.seqs))

    def select(self, keep: list[int]) -> None:
        for i in set(range(len(self.seqs))) - set(keep):
            self.runner._release(self.seq_ids[i])
        seq_ids: list[int] = []
        for j, i in enumerate(keep):
            seq = self.seq_ids[i]
            if i in keep[:j]:  # a repeat: the row gets a copy of the sequence
                fork = self.runner._take()
                self.runner.model.lib.llama_memory_seq_cp(self.runner.model.memory, seq, fork, -1, -1)
                seq = fork
            seq_ids.append(seq)
        self.rows_logprobs = {j: self.rows_logprobs[i] for j, i in enumerate(keep) if i in self.rows_logprobs}
        self.seqs = [self.seqs[i] for i in keep]
        self.seq_ids = seq_ids
        self.done = [self.done[i] for i in keep]
        if self.logprobs is not None:
            self.logprobs = self.logprobs[keep]


class LlamaCppRunner:
    """Running rows as llama.cpp sequences (see the module docs)."""

    def __init__(self, model: LlamaCppModel) -> None:
        self.model = model
        self.free = list(range(model.max_sequences))
        self.seq_ids: list[int] = []
        self.lengths: list[int] = []  # tokens each row's sequence holds (its next position)
        self.next_tokens: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.seq_ids)

    def _take(self) -> int:
        if not self.free:
            raise PrefalignError(
                f"the llama.cpp context holds at most {self.model.max_sequences} rows (contexts × beams of all "
                "running requests); send fewer requests at once or smaller beams",
                field="prompt",
            )
        return self.free.pop(0)

    def _release(self, seq: int) -> None:
        self.model.lib.llama_memory_seq_rm(self.model.memory, seq, -1, -1)
        self.free.append(seq)

    def start_prefill(self, seqs: list[list[int]], tags: list[str]) -> SequencePrefill:
        if len(seqs) > len(self.free):
            raise PrefalignError(
                f"{len(seqs)} new rows do not fit: the llama.cpp context holds at most {self.model.max_sequences} "
                f"rows and {self.model.max_sequences - len(self.free)} are in use",
                field="prompt",
            )
        return SequencePrefill(seqs=[list(s) for s in seqs], seq_ids=[self._take() for _ in seqs], done=[0] * len(seqs), runner=self)

    def prefill_step(self, prefill: SequencePrefill, budget: int | None) -> int:
        spent = 0
        limit = budget if budget is not None else sum(len(s) - d for s, d in zip(prefill.seqs, prefill.done))
        limit = max(1, limit)
        while spent < limit and not prefill.finished:
            tokens, positions, seqs, outputs, finishing = [], [], [], [], []
            room = min(self.model.n_batch, limit - spent)
            for i, (seq, done) in enumerate(zip(prefill.seqs, prefill.done)):
                take = min(len(seq) - done, room - len(tokens))
                if take <= 0:
                    continue
                for offset in range(take):
                    tokens.append(seq[done + offset])
                    positions.append(done + offset)
                    seqs.append(prefill.seq_ids[i])
                    last = done + offset == len(seq) - 1
                    outputs.append(last)
                    if last:
                        finishing.append(i)
                prefill.done[i] = done + take
                if len(tokens) >= room:
                    break
            out = self.model.decode_batch(tokens, positions, seqs, outputs)
            for j, i in enumerate(finishing):
                assert out is not None
                prefill.rows_logprobs[i] = out[j]
            spent += len(tokens)
        if prefill.finished:
            prefill.logprobs = torch.stack([prefill.rows_logprobs[i] for i in range(len(prefill.seqs))])
        return spent

    def join(self, prefill: SequencePrefill) -> None:
        self.seq_ids.extend(prefill.seq_ids)
        self.lengths.extend(len(s) for s in prefill.seqs)
        self.next_tokens.extend([0] * len(prefill.seqs))

    def decode(self) -> torch.Tensor:
        out = self.model.decode_batch(self.next_tokens, list(self.lengths), list(self.seq_ids), [True] * len(self.seq_ids))
        self.lengths = [n + 1 for n in self.lengths]
        assert out is not None
        return out

    def feed(self, next_tokens: torch.Tensor) -> None:
        """The same rows, fed ``next_tokens`` next."""
        self.next_tokens = next_tokens.tolist()

    def select(self, keep: list[int], next_tokens: list[int]) -> None:
        used: set[int] = set()
        seq_ids, lengths = [], []
        for old in keep:
            seq = self.seq_ids[old]
            if old in used:  # a beam forks: its parent's sequence is copied
                fork = self._take()
                self.model.lib.llama_memory_seq_cp(self.model.memory, seq, fork, -1, -1)
                seq = fork
            used.add(old)
            seq_ids.append(seq)
            lengths.append(self.lengths[old])
        for old, seq in enumerate(self.seq_ids):
            if old not in used:
                self._release(seq)
        self.seq_ids, self.lengths, self.next_tokens = seq_ids, lengths, list(next_tokens)


def gguf_path_for(name: str | os.PathLike[str] | None) -> Path:
    """The GGUF file behind a model argument: the embedded model's, a ``.gguf`` path, or
    the one ``.gguf`` in a directory."""
    from .. import local_models
    from ..models import EMBEDDED_MODEL, embedded_gguf_path

    if name is None or str(name) in (EMBEDDED_MODEL, ""):
        return embedded_gguf_path()
    if str(name) in local_models.MODELS:  # a short name of an opt-in local model
        return local_models.require(str(name))
    path = Path(str(name)).expanduser()
    if path.suffix == ".gguf":
        return existing_gguf(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    raise ModelLoadError(
        f"the llama.cpp backend needs a GGUF file; {str(name)!r} is not one (give a .gguf path, "
        "a directory holding exactly one, or no model for the embedded one)",
        field="model",
    )


def load_llamacpp(path: str | os.PathLike[str], *, threads: int | None = None, **kwargs: Any) -> tuple[LlamaCppModel, Any]:
    """``(model, tokenizer)`` for a GGUF file on the llama.cpp backend.

    The tokenizer is transformers' reading of the same GGUF (same token ids as llama.cpp's
    vocabulary), cached without converting the weights.
    """
    from ..models import gguf_tokenizer

    model = LlamaCppModel(path, threads=threads, **kwargs)
    tokenizer = gguf_tokenizer(Path(path))
    if len(tokenizer) > model.vocab_size + 16 or model.vocab_size > len(tokenizer) + 1024:
        raise ModelLoadError(
            f"the tokenizer read from {path} has {len(tokenizer)} tokens but llama.cpp's vocabulary {model.vocab_size}",
            field="model",
        )
    return model, tokenizer


__all__ = ["LlamaCppModel", "LlamaCppRunner", "gguf_path_for", "load_llamacpp"]
