"""CPU fast path: run a model's ``nn.Linear`` layers through prepacked oneDNN kernels.

On a small CPU, decoding a 135M-parameter model with plain fp32 transformers is bound
by MKL's fp32 GEMM at tiny batch sizes (M = 1 or 2 rows per step), which is slow and
scales badly from one row to two. oneDNN (``torch.ops.mkldnn``) with the weights
reordered once ("prepacked") into its blocked layout is much faster there, in bf16
and even in fp32, and a 2-row step costs barely more than a 1-row step.

:func:`optimize_for_cpu` changes a model in place:

* every plain ``nn.Linear`` is replaced by a :class:`PackedLinear` (a subclass of
  ``nn.Linear`` that keeps the very same ``weight``/``bias`` parameters, so
  ``state_dict`` keys, tied embeddings and ``isinstance`` checks are unchanged) whose
  forward calls ``torch.ops.mkldnn._linear_pointwise`` on a prepacked copy of the
  weight;
* sibling projections that read the same input (``q_proj``/``k_proj``/``v_proj``,
  ``gate_proj``/``up_proj`` and a few other common spellings) are fused into one GEMM.
  Fusion is decided at run time, not from the modelling code: the first sibling
  called computes the fused product and the others take their slice *only if they
  are called with the very same input tensor* (same object, unmodified); otherwise
  each computes its own product. So it is exact for any architecture, whatever order
  or inputs its forward uses.

Only the matmuls change; attention, norms, rotary embeddings, masks, padding and KV
caches are untouched, so left-padded batches and ``Cache`` objects work as before.
(A side benefit: for most of the embedded model's layer shapes, oneDNN's result for
one row is bit-identical whatever the number of rows, where MKL's fp32 GEMM changes
in the last bits with the batch size; not for all shapes, so batch invariance of
greedy tokens still rests on the engine, not on this module.)

Precision. The default, ``dtype=torch.float32``, keeps fp32 everywhere (oneDNN fp32
with prepacked weights): results differ from plain fp32 only by summation order
(~1e-6 relative), and greedy tokens of the embedded model were identical to plain fp32
on all 8 benchmark prompts over 128 tokens. ``dtype=torch.bfloat16`` is faster still,
but rounds every layer's input and weight to bf16 (accumulating in fp32), which
**changes greedy tokens** wherever the top two logits are close (5 of those 8 prompts
diverged, at logit margins of 0.001-0.06, whether or not ``lm_head`` stayed fp32); it
is opt-in. See ``benchmarks/fastpath_speed.py`` for the speed of each.

The fast path is an inference path: when autograd is recording and a weight or the
input requires grad, a layer falls back to the plain ``F.linear`` so gradients stay
correct. It never applies to a model on CUDA or any other non-CPU device.

Example::

    model, tok = prefalign.models.load_model()
    report = optimize_for_cpu(model)
    print(report)            # what was replaced and fused, or why it was not applied
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_FUSE_GROUPS",
    "FastPathReport",
    "FusedLinearGroup",
    "PackedLinear",
    "is_optimized",
    "is_supported",
    "optimize_for_cpu",
    "recommended_num_threads",
    "release_packed_originals",
    "restore",
    "unsupported_reason",
]

#: Sibling ``nn.Linear`` names (children of one module) that usually read the same
#: input and can be computed as one GEMM. Each group is fused when at least two of its
#: members are present as plain ``nn.Linear`` children with matching input size.
DEFAULT_FUSE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2, Gemma, OPT, ...
    ("gate_proj", "up_proj"),  # Llama-style gated MLPs
    ("query", "key", "value"),  # BERT-style attention
    ("w1", "w3"),  # Mixtral-style expert MLPs
)

# Names of the attribute under which the report is stored on an optimised model.
_REPORT_ATTR = "_prefalign_fastpath"

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------- support


def unsupported_reason(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why the fast path cannot run in ``dtype`` on this CPU/torch build, or ``None``.

    Checks that torch was built with oneDNN (mkldnn), that its prepacked linear ops
    exist, and that oneDNN supports ``dtype`` on this CPU (bf16 needs AVX512-BF16/AMX
    or at least AVX512 for oneDNN's emulation; fp16 needs AVX512-FP16/AMX-FP16).
    """
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported (use one of {_SUPPORTED_DTYPES})"
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    try:
        ops = torch.ops.mkldnn
        _ = ops._reorder_linear_weight, ops._linear_pointwise
    except (AttributeError, RuntimeError):
        return "this torch build lacks torch.ops.mkldnn._reorder_linear_weight/_linear_pointwise"
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "oneDNN does not support bf16 on this CPU"
        if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            return "oneDNN does not support fp16 on this CPU"
    except (AttributeError, RuntimeError) as exc:  # older/odd builds
        return f"cannot query oneDNN {dtype} support: {exc}"
    return None


def is_supported(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when this CPU and torch build can run the fast path in ``dtype``."""
    return unsupported_reason(dtype) is None


def recommended_num_threads() -> int:
    """The intra-op thread count we recommend for decoding on a small shared CPU: 1.

    Measured on the 2-core development machine while other processes were using it
    (``benchmarks/fastpath_speed.py``): with 2 threads a decode step was 3-25x *slower*
    than with 1, because libgomp's worker threads spin-wait for each other and lose
    their time slices to the other processes; with ``OMP_WAIT_POLICY=PASSIVE`` set
    before torch is imported the collapse disappears, but 2 threads were still no
    faster than 1 for a 135M model. One thread degrades gracefully under sharing.
    """
    return 1


# --------------------------------------------------------------------------- modules


def _pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reorder ``weight`` (out × in) once into oneDNN's blocked layout in ``dtype``."""
    # detach(): the packed copy is an inference-only constant, never a leaf of autograd.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), None)


def _mkldnn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x @ W.T + b`` with a prepacked weight; input is cast to ``dtype``, output back."""
    y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")
    return y.to(x.dtype)


def _needs_autograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when autograd is recording and gradients would flow through this matmul."""
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def _version(t: torch.Tensor) -> int:
    """``t``'s in-place modification counter, or -1 for an inference tensor.

    Tensors created under ``torch.inference_mode()`` have no version counter; for
    them only identity is checked (they cannot be modified outside that mode).
    """
    return -1 if t.is_inference() else t._version


class _ParamWatch:
    """Tells cheaply whether some parameters changed since they were packed.

    The version counter catches in-place writes (``load_state_dict``, ``copy_``); the
    data pointer catches ``param.data = ...`` swaps (``model.to(dtype)``). Checked on
    every call, so it is kept to a few attribute reads (~1 us).
    """

    __slots__ = ("_all", "_versioned", "_snapshot")

    def __init__(self, params: Sequence[torch.Tensor | None]) -> None:
        self._all = tuple(p for p in params if p is not None)
        # Inference tensors have no version counter: watch only their data pointer.
        self._versioned = tuple(p for p in self._all if not p.is_inference())
        self._snapshot = self._now()

    def _now(self) -> list[int]:
        return [p._version for p in self._versioned] + [p.data_ptr() for p in self._all]

    def changed(self) -> bool:
        return self._now() != self._snapshot

    def reset(self) -> None:
        self._snapshot = self._now()


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses a prepacked oneDNN weight.

    It shares ``weight`` and ``bias`` with the layer it replaces (no copy in
    ``state_dict``; tied weights stay tied). The packed copy is refreshed
    automatically when the weight or bias is modified in place (tracked through the
    tensors' version counters and data pointers), e.g. by ``load_state_dict``.

    The forward falls back to ``F.linear`` (identical to the original layer) for
    inputs not on the CPU, of a dtype oneDNN does not handle (float64), or when
    autograd needs gradients.
    """

    def __init__(
        self,
        linear: nn.Linear,
        dtype: torch.dtype,
        group: FusedLinearGroup | None = None,
        slot: int = 0,
        *,
        pack: bool = True,
    ) -> None:
        # Skip nn.Linear.__init__: it would allocate and initialise fresh weights.
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.compute_dtype = dtype
        # Plain attributes (not buffers): packed tensors must not enter state_dict.
        self._group = group
        self._slot = slot
        self._packed: torch.Tensor | None = None
        self._packed_bias: torch.Tensor | None = None
        self._watch: _ParamWatch | None = None
        # A member of a fused group (pack=False, its group set right after) never uses a
        # packed copy of its own: packing it too held every q/k/v/gate/up weight twice.
        if group is None and pack:
            self._repack()

    def _repack(self) -> None:
        self._packed = _pack(self.weight, self.compute_dtype)
        self._packed_bias = None if self.bias is None else self.bias.detach().to(self.compute_dtype)
        self._watch = _ParamWatch((self.weight, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu or x.dtype not in _SUPPORTED_DTYPES or _needs_autograd(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        if self._group is not None:
            return self._group.output(self._slot, x)
        if self._watch is None or self._watch.changed():
            self._repack()
        return _mkldnn_linear(x, self._packed, self._packed_bias, self.compute_dtype)

    def __getstate__(self) -> dict:
        # oneDNN's packed tensors cannot be copied or pickled; drop them and let the
        # copy repack on its first forward (deepcopy, torch.save of the module).
        state = self.__dict__.copy()
        state.update(_packed=None, _packed_bias=None, _watch=None)
        return state

    def extra_repr(self) -> str:
        fused = f", fused={self._group.names}" if self._group is not None else ""
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}{fused}"


class FusedLinearGroup:
    """Sibling linear layers computed as one GEMM when called with the same input.

    The first member called with input ``x`` computes ``x @ [W_1; W_2; ...].T`` and
    keeps the other members' slices; a later member called with the *same tensor
    object*, unmodified since, returns its slice; any other call computes the fused
    product afresh. The stash is per thread, so concurrent forwards cannot mix.
    """

    def __init__(self, names: Sequence[str], members: Sequence[PackedLinear]) -> None:
        self.names = tuple(names)
        self.members = list(members)
        self.dtype = members[0].compute_dtype
        self._splits = [m.out_features for m in members]
        self._local = threading.local()
        self._packed: torch.Tensor | None = None
        self._packed_bias: torch.Tensor | None = None
        self._watch: _ParamWatch | None = None
        self._repack()

    def _repack(self) -> None:
        weight = torch.cat([m.weight.detach() for m in self.members], dim=0)
        self._packed = _pack(weight, self.dtype)
        if all(m.bias is None for m in self.members):
            self._packed_bias = None
        else:
            # A member without bias contributes zeros: adding 0.0 is exact.
            biases = [
                m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                for m in self.members
            ]
            self._packed_bias = torch.cat(biases).to(self.dtype)
        self._watch = _ParamWatch([p for m in self.members for p in (m.weight, m.bias)])

    def __getstate__(self) -> dict:
        # Packed tensors and the thread-local stash cannot be copied: rebuilt lazily.
        state = self.__dict__.copy()
        state.update(_packed=None, _packed_bias=None, _watch=None, _local=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def output(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``slot``'s output for input ``x`` (from the stash when possible)."""
        local = self._local
        stash = getattr(local, "stash", None)
        if stash is not None:
            x_ref, x_version, outs, pending = stash
            if x_ref is x and x_version == _version(x) and slot in pending:
                pending.discard(slot)
                if not pending:
                    local.stash = None  # release the activations as soon as all are used
                return outs[slot]
        if self._watch is None or self._watch.changed():
            self._repack()
        y = _mkldnn_linear(x, self._packed, self._packed_bias, self.dtype)
        # contiguous(): modelling code may .view() the projection in ways a strided
        # slice of the fused output would not allow.
        outs = [part.contiguous() for part in y.split(self._splits, dim=-1)]
        pending = set(range(len(self.members))) - {slot}
        local.stash = (x, _version(x), outs, pending) if pending else None
        return outs[slot]


# --------------------------------------------------------------------------- report


@dataclass
class FastPathReport:
    """What :func:`optimize_for_cpu` did to a model.

    ``active`` is True when the fast path is in place; ``reason`` says why not
    otherwise (``"not applied: ..."``). ``replaced`` lists the qualified names of the
    accelerated linear layers, ``fused`` the groups computed as one GEMM, and
    ``skipped`` the linear-like modules left alone, with why.
    """

    active: bool
    reason: str
    dtype: torch.dtype | None = None
    lm_head_dtype: torch.dtype | None = None
    replaced: list[str] = field(default_factory=list)
    fused: list[tuple[str, ...]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: Bytes of original weights whose resident pages were handed back to their file
    #: (see :func:`release_packed_originals`).
    released: int = 0

    def summary(self) -> str:
        """One line for logs and CLIs."""
        if not self.active:
            return f"CPU fast path {self.reason}"
        head = f", lm_head {_dt(self.lm_head_dtype)}" if self.lm_head_dtype else ", lm_head not accelerated"
        return (
            f"CPU fast path active: {len(self.replaced)} linear layers on oneDNN in "
            f"{_dt(self.dtype)}{head}, {len(self.fused)} fused groups"
            + (f", {len(self.skipped)} skipped" if self.skipped else "")
        )

    def __str__(self) -> str:
        return self.summary()


def _dt(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "-"


# --------------------------------------------------------------------------- apply


def _why_not_plain(module: nn.Module) -> str | None:
    """Why ``module`` cannot be swapped for a :class:`PackedLinear`, or ``None``.

    Only exact ``nn.Linear`` instances with floating weights qualify. Layers with hooks
    or a patched ``forward`` (accelerate's offloading, instrumentation) are left alone:
    replacing the module would silently drop them.
    """
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is not a plain nn.Linear"
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype}"
    if "forward" in vars(module):
        return "forward is patched (e.g. an accelerate hook)"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "has hooks"
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's vocabulary projection (``lm_head``), found without naming it."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            return head
    head = getattr(model, "lm_head", None)
    return head if isinstance(head, nn.Module) else None


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        if t.device.type != "cpu":
            return t.device
    for t in model.buffers():
        if t.device.type != "cpu":
            return t.device
    return None


def _trial(dtype: torch.dtype) -> str | None:
    """Run one tiny prepacked matmul; return an error text if it fails or is wrong."""
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(24, 40, generator=gen)
        x = torch.randn(3, 40, generator=gen)
        y = _mkldnn_linear(x, _pack(w, dtype), None, dtype)
        ref = F.linear(x.to(dtype).float(), w.to(dtype).float())
        if y.shape != ref.shape or not torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * 40):
            return f"trial {dtype} matmul gave wrong results"
    except Exception as exc:  # any failure means: leave the model alone
        return f"trial {dtype} matmul failed: {type(exc).__name__}: {exc}"
    return None


def optimize_for_cpu(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    fuse: bool = True,
    include_lm_head: bool = True,
    lm_head_dtype: torch.dtype | None = None,
    fuse_groups: Sequence[Sequence[str]] = DEFAULT_FUSE_GROUPS,
) -> FastPathReport:
    """Make ``model``'s linear layers run through prepacked oneDNN kernels, in place.

    Args:
        model: any ``nn.Module`` (typically a transformers causal LM) on the CPU.
            Only modules whose type is exactly ``nn.Linear`` are replaced; subclasses
            (quantised, LoRA, ...) and layers with hooks are left alone and listed in
            ``report.skipped``. Apply it after the weights are loaded (later in-place
            changes are picked up, at the cost of a repack).
        dtype: compute dtype of the linear layers. ``torch.float32`` (default) keeps
            greedy tokens identical to plain fp32 (measured on the embedded model).
            ``torch.bfloat16`` is faster but **changes greedy tokens** on near-ties;
            opt in only where that is acceptable.
        fuse: compute sibling projections that share an input as one GEMM.
        include_lm_head: also accelerate the output projection (found through
            ``get_output_embeddings()``). If False it stays a plain ``nn.Linear``
            (slower: MKL's fp32 GEMM on a vocabulary-sized weight).
        lm_head_dtype: compute dtype of the output projection; ``None`` (default)
            means ``dtype``. ``torch.float32`` with ``dtype=torch.bfloat16`` keeps the
            head exact, but that alone did not keep tokens identical.
        fuse_groups: the sibling names to fuse (see :data:`DEFAULT_FUSE_GROUPS`).

    Returns:
        A :class:`FastPathReport`. When the fast path is not supported here, the model
        is on a non-CPU device, or a trial matmul fails, the model is left unchanged
        and ``report.active`` is False with the reason. Calling it again on an
        optimised model returns the existing report.
    """
    previous = getattr(model, _REPORT_ATTR, None)
    if isinstance(previous, FastPathReport) and previous.active:
        return previous

    device = _model_device(model)
    if device is not None:
        return FastPathReport(False, f"not applied: model on {device.type}")

    head = _output_head(model) if include_lm_head else None
    if lm_head_dtype is None:
        lm_head_dtype = dtype
    dtypes = [dtype] + ([lm_head_dtype] if head is not None and lm_head_dtype != dtype else [])
    for dt in dtypes:
        if not is_supported(dt):
            why = unsupported_reason(dt) or f"{_dt(dt)} not supported by oneDNN here"
            return FastPathReport(False, f"not applied: {why}")
        failure = _trial(dt)
        if failure is not None:
            return FastPathReport(False, f"not applied: {failure}")

    names = {id(m): n for n, m in model.named_modules()}
    excluded_head = _output_head(model) if not include_lm_head else None
    report = FastPathReport(
        True,
        "applied",
        dtype=dtype,
        lm_head_dtype=lm_head_dtype if head is not None else None,
    )
    # Build every replacement first and swap only at the end, so that a failure while
    # packing leaves the model untouched.
    swaps: list[tuple[nn.Module, str, PackedLinear]] = []
    try:
        for parent in model.modules():
            children = dict(parent.named_children())
            taken: set[str] = set()
            if fuse:
                for group_names in fuse_groups:
                    present = [
                        n
                        for n in group_names
                        if n in children and children[n] is not head and _why_not_plain(children[n]) is None
                    ]
                    if len(present) < 2:
                        continue
                    lins = [children[n] for n in present]
                    if len({(lin.in_features, lin.weight.dtype) for lin in lins}) != 1:
                        continue  # not siblings of one input: accelerate them one by one
                    wrappers = [PackedLinear(lin, dtype, slot=i, pack=False) for i, lin in enumerate(lins)]
                    group = FusedLinearGroup(present, wrappers)
                    for w in wrappers:
                        w._group = group
                    prefix = names[id(parent)]
                    qualified = tuple(f"{prefix}.{n}" if prefix else n for n in present)
                    report.fused.append(qualified)
                    for n, w, q in zip(present, wrappers, qualified):
                        swaps.append((parent, n, w))
                        report.replaced.append(q)
                        taken.add(n)
            for n, child in children.items():
                if n in taken or not isinstance(child, nn.Linear) or isinstance(child, PackedLinear):
                    continue  # not a linear layer, or already on the fast path
                q = f"{names[id(parent)]}.{n}" if names[id(parent)] else n
                if child is excluded_head:
                    report.skipped.append(f"{q} (include_lm_head=False)")
                    continue
                why = _why_not_plain(child)
                if why is not None:
                    report.skipped.append(f"{q} ({why})")
                    continue
                dt = lm_head_dtype if child is head else dtype
                swaps.append((parent, n, PackedLinear(child, dt)))
                report.replaced.append(q)
    except Exception as exc:  # packing failed on a real weight: leave the model alone
        return FastPathReport(False, f"not applied: packing failed: {type(exc).__name__}: {exc}")

    for parent, n, wrapper in swaps:
        setattr(parent, n, wrapper)
    setattr(model, _REPORT_ATTR, report)
    report.released = release_packed_originals(model)
    return report


_MADV_PAGEOUT = 21  # Linux ≥ 5.4: reclaim these pages now (never loses data)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (``/proc/self/maps``)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            spans.append((start, end))
    return spans


def release_packed_originals(model: nn.Module) -> int:
    """Hand the resident pages of the weights the fast path packed back to their file.

    transformers maps safetensors weights from the file; packing reads them all, so
    they become resident beside their packed copies (the embedded model: 513 MB of
    fp32 weights next to 513 MB packed). The fast path never reads them again
    (``_ParamWatch`` reads only version counters and data pointers), so they are
    advised out with ``madvise(MADV_PAGEOUT)``: they stay valid and are read back
    from the file when something does use them (the plain-``F.linear`` fallback,
    ``state_dict``, the embedding rows of a tied ``lm_head``). Weights on the heap (a
    model built or modified in memory) are left alone. Linux only; elsewhere, or on
    an older kernel, nothing changes. Returns the bytes advised.
    """
    if not sys.platform.startswith("linux"):
        return 0
    spans = _file_mappings()
    if not spans:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    page = mmap.PAGESIZE
    released = 0
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, PackedLinear):
            continue
        weight = module.weight
        ptr, size = weight.data_ptr(), weight.numel() * weight.element_size()
        if ptr in seen or not size or not any(start <= ptr and ptr + size <= end for start, end in spans):
            continue
        seen.add(ptr)
        # Rounded out to whole pages: a neighbouring tensor sharing an edge page is
        # paged out too, and simply read back (file-backed) when used.
        start = ptr // page * page
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(ptr + size - start), _MADV_PAGEOUT) == 0:
            released += size
    return released


def is_optimized(model: nn.Module) -> bool:
    """True when :func:`optimize_for_cpu` is active on ``model``."""
    report = getattr(model, _REPORT_ATTR, None)
    return isinstance(report, FastPathReport) and report.active


def restore(model: nn.Module) -> int:
    """Undo :func:`optimize_for_cpu`: put plain ``nn.Linear`` layers back, in place.

    The original parameters are reused (nothing is copied). Returns the number of
    layers restored.
    """
    count = 0
    for parent in list(model.modules()):
        for n, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                lin = nn.Linear.__new__(nn.Linear)
                nn.Module.__init__(lin)
                lin.in_features, lin.out_features = child.in_features, child.out_features
                lin.weight, lin.bias = child.weight, child.bias
                setattr(parent, n, lin)
                count += 1
    if hasattr(model, _REPORT_ATTR):
        delattr(model, _REPORT_ATTR)
    return count
