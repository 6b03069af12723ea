"""The personalised reward model (PRM) of PAD: policy backbone + LoRA + a d×d linear layer.

Architecture (Chen et al., *PAD: Personalized Alignment at Decoding-Time*)::

    input ids ──► backbone (frozen policy weights + LoRA adapters) ──► h  [B, T, d]
              ──► Linear(d, d), initialised to the identity            ──► h'
              ──► LM head (frozen, the policy's)                        ──► logits

The token-level reward of candidate ``y`` after a context is
``log_softmax(PRM)[y] − log_softmax(policy)[y]``. With untrained adapters (LoRA's B
matrices start at zero) and the identity linear layer the PRM's logits equal the
policy's bit for bit, so that reward is exactly zero and PAD decodes like the base.

**Copy, not wrap.** :func:`build_prm` builds a *structural* copy of the policy whose
parameters are new ``Parameter`` objects sharing the policy's storage (no extra
memory for the frozen weights). LoRA layers are injected into the copy's modules only,
so the policy object used for decoding keeps its own modules, its own
``requires_grad`` flags and any fast path (``prefalign.fastpath``) applied before or
after. Merging adapters for inference (:meth:`PersonalizedRewardModel.merge_adapters`)
writes *new* weight tensors for the adapted layers and never modifies shared storage.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..compat import cache_keyword, output_cache, output_cache_field
from ..errors import PrefalignError

#: Linear layers of the usual decoder blocks (Llama, Mistral, Qwen2, Gemma, ...).
#: ``"all-linear"`` (peft's shortcut) covers other architectures.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PrefalignError(
            "personalised reward models need peft: pip install 'prefalign[prm]' (or pip install peft)",
            field="prm",
        ) from exc
    return peft


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    prefix = getattr(model, "base_model_prefix", "model")
    backbone = getattr(model, prefix, None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        raise PrefalignError(
            f"cannot find the backbone and LM head of {type(model).__name__}; a PRM needs a transformers "
            "*ForCausalLM model with a base model and an output embedding",
            field="prm",
        )
    return backbone, head


def _shared_copy(policy: nn.Module) -> nn.Module:
    """Deep-copy ``policy``'s modules while sharing its tensors' storage (frozen).

    Each parameter becomes a new ``Parameter`` (``requires_grad=False``) over the same
    storage, so freezing/training the copy never touches the policy's flags; tied
    weights stay tied (one new Parameter per original). Fast-path layers of an
    accelerated policy are copied as plain ``nn.Linear`` layers.
    """
    memo: dict[int, Any] = {}
    for p in policy.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in policy.buffers():
        memo[id(b)] = b
    try:
        from ..fastpath import PackedLinear
    except ImportError:  # pragma: no cover
        PackedLinear = ()  # type: ignore[assignment]
    for module in policy.modules():
        if PackedLinear and isinstance(module, PackedLinear):
            plain = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(plain)
            plain.in_features, plain.out_features = module.in_features, module.out_features
            plain.weight = memo[id(module.weight)]
            plain.bias = None if module.bias is None else memo[id(module.bias)]
            memo[id(module)] = plain
    clone = copy.deepcopy(policy, memo)
    with contextlib.suppress(AttributeError):
        delattr(clone, "_prefalign_fastpath")
    for name in [n for n in vars(clone) if n.startswith("_prefalign_fastpath")]:
        delattr(clone, name)
    return clone


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def _layer_index(name: str) -> int | None:
    """Decoder block index of a module name (``layers.12.self_attn.q_proj`` → 12)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _output_from_hidden(prm: PersonalizedRewardModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = prm.lm_head(prm.linear(hidden))
    cap = getattr(prm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(prm.config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    return logits


class PersonalizedRewardModel(nn.Module):
    """A PAD personalised reward model; call it like a causal LM (KV cache included).

    Attributes: ``backbone`` (the policy's base model with LoRA layers, or merged
    weights after :meth:`merge_adapters`), ``linear`` (``Linear(d, d)``), ``lm_head``
    (the policy's, frozen), ``config`` (the policy's config), ``lora_config``.
    """

    def __init__(self, backbone: nn.Module, lm_head: nn.Module, config: Any, *, lora_config: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head
        self.config = config
        self.lora_config = lora_config
        d = config.hidden_size
        ref = next(lm_head.parameters())
        self.linear = nn.Linear(d, d, bias=False, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(d, device=ref.device, dtype=ref.dtype))
        self.merged = False

    # -- running ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.linear.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.linear.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """Logits like a causal LM's; the KV cache goes in under :attr:`cache_keyword`."""
        from transformers.modeling_outputs import CausalLMOutputWithPast
        from transformers.modeling_utils import slice_logits_to_keep

        kwargs.pop("labels", None)
        kwargs.pop("return_dict", None)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        cache = {output_cache_field(CausalLMOutputWithPast): output_cache(out)}
        return CausalLMOutputWithPast(logits=_output_from_hidden(self, hidden), **cache)

    @property
    def cache_keyword(self) -> str:
        """The KV-cache keyword of the backbone, which receives it (see :mod:`prefalign.compat`)."""
        return cache_keyword(self.backbone)

    def hidden_to_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Linear layer and LM head on final hidden states (for training on chosen positions)."""
        return _output_from_hidden(self, hidden)

    # -- adapters ----------------------------------------------------------------------

    def lora_layers(self) -> Iterator[tuple[str, nn.Module]]:
        peft = _require_peft()
        for name, module in self.backbone.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                yield name, module

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Within the block the PRM computes like the policy (adapters off, identity linear)."""
        layers = [m for _, m in self.lora_layers()]
        saved = self.linear.weight.data
        for m in layers:
            m.enable_adapters(False)
        self.linear.weight.data = torch.eye(saved.shape[0], dtype=saved.dtype, device=saved.device)
        try:
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)
            self.linear.weight.data = saved

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights, keyed like peft's saved adapters (adapter name removed)."""
        if self.merged:
            raise PrefalignError("this PRM's adapters are merged; save it before merging", field="prm")
        peft = _require_peft()
        return peft.get_peft_model_state_dict(self.backbone, adapter_name=ADAPTER_NAME)

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        peft = _require_peft()
        result = peft.set_peft_model_state_dict(self.backbone, state, adapter_name=ADAPTER_NAME)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise PrefalignError(f"adapter weights do not fit this model: unexpected keys {unexpected[:4]}", field="prm")
        loaded = set(state)
        expected = {k for k in self.adapter_state_dict()}
        missing = expected - loaded
        if missing:
            raise PrefalignError(f"adapter weights are incomplete: missing {sorted(missing)[:4]}", field="prm")

    @torch.no_grad()
    def merge_adapters(self) -> int:
        """Replace every LoRA layer by a plain linear layer with ``W + ΔW`` (new tensors).

        The frozen weights shared with the policy are not modified. Returns the number
        of layers merged. Training is no longer possible afterwards.
        """
        count = 0
        for name, module in list(self.lora_layers()):
            base = module.get_base_layer()
            delta = module.get_delta_weight(ADAPTER_NAME)
            merged = copy.copy(base)  # same class (nn.Linear, Conv1D, ...), own parameter dict
            merged._parameters = dict(base._parameters)
            merged.weight = nn.Parameter((base.weight.float() + delta.float()).to(base.weight.dtype), requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
            setattr(parent, child, merged)
            count += 1
        self.linear.weight.requires_grad_(False)
        self.merged = True
        return count


def build_prm(
    policy_model: nn.Module,
    *,
    lora_r: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] | str | None = None,
    lora_dropout: float = 0.0,
    layers: Sequence[int] | None = None,
) -> PersonalizedRewardModel:
    """A fresh (untrained) PRM for ``policy_model``: its logits equal the policy's.

    ``layers`` restricts the adapters to these decoder blocks (indices; None = all).
    Adapting only the top blocks makes training much cheaper: nothing below the
    lowest adapted block needs a backward pass.

    The policy is *copied* structurally with shared, frozen weight storage (see the
    module docstring): LoRA injection replaces modules, which must not happen in the
    policy that decodes. ``target_modules`` defaults to the attention and MLP
    projections of Llama-style blocks when present, else peft's ``"all-linear"``.
    Trainable: the LoRA matrices and the ``Linear(d, d)`` layer.
    """
    peft = _require_peft()
    if lora_r < 1:
        raise PrefalignError(f"lora_r must be ≥ 1, got {lora_r}", field="lora_r")
    clone = _shared_copy(policy_model)
    backbone, head = _backbone_and_head(clone)
    if target_modules is None:
        names = {n.rpartition(".")[2] for n, m in backbone.named_modules() if isinstance(m, _linear_types())}
        found = [t for t in DEFAULT_TARGET_MODULES if t in names]
        target_modules = found or "all-linear"
    targets: Any = target_modules if isinstance(target_modules, str) else list(target_modules)
    if targets == "all-linear":
        # peft resolves "all-linear" only for PreTrainedModels; spell it out for the bare backbone.
        targets = sorted({n.rpartition(".")[2] for n, m in backbone.named_modules() if isinstance(m, _linear_types())})
        if not targets:
            raise PrefalignError("the backbone has no linear layers to adapt; pass target_modules", field="prm")
    wanted = {targets} if isinstance(targets, str) else set(targets)
    if layers is not None:
        keep = {int(i) for i in layers}
        if not keep:
            raise PrefalignError("layers is empty; pass None to adapt every block", field="layers")
        if isinstance(targets, str):
            raise PrefalignError("layers needs target_modules as a list of names", field="layers")
        full = [
            n for n, m in backbone.named_modules()
            if isinstance(m, _linear_types()) and n.rpartition(".")[2] in wanted and _layer_index(n) in keep
        ]
        if not full:
            raise PrefalignError(f"no {sorted(wanted)} layers in blocks {sorted(keep)}", field="layers")
        targets = full
    conv1d = any(type(m).__name__ == "Conv1D" and n.rpartition(".")[2] in wanted for n, m in backbone.named_modules())
    config = peft.LoraConfig(
        r=lora_r,
        fan_in_fan_out=conv1d,  # GPT-2 style Conv1D layers store weights transposed
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        bias="none",
    )
    backbone = peft.inject_adapter_in_model(config, backbone, adapter_name=ADAPTER_NAME)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    prm = PersonalizedRewardModel(backbone, head, clone.config, lora_config=config)
    prm.linear.weight.requires_grad_(True)
    for p in prm.lm_head.parameters():
        p.requires_grad_(False)
    prm.eval()
    return prm
