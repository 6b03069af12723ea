"""PAD in one forward per step: the policy's rows and the PRM's rows in a single pass.

A PAD reward model is the policy's frozen weights plus small LoRA adapters and a
``Linear(d, d)`` before the LM head. Running it as a second model (two passes per
step) reads every weight twice; but the frozen weights are the policy's, so one pass
over the policy *and* PRM rows together can share them: per adapted layer the policy's
own (possibly fast-path accelerated) linear layer computes all rows, and the LoRA
update ``B A x · scaling`` is added to the PRM's rows only; the linear layer is
applied to the PRM rows' last hidden states before the LM head. The policy's rows are
computed by exactly the policy's code (nothing is added to them).

:class:`FusedPadModel` is registered under the engine's ``"prm"`` key with
``serves = ("policy", "prm")``: the engine then runs the rows of both keys in one
forward of this module, passing ``route`` (per row: 0 = policy, 1 = PRM). The LoRA
terms are attached to the policy's modules with forward hooks for the duration of
that call only, so the policy object is unchanged between calls and other methods
sharing it are unaffected.

On a CPU a forward over 2R rows costs much less than two forwards over R rows when
the weights are read from memory once per pass (see ``benchmarks/pad_speed.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .compat import cache_keyword
from .errors import PrefalignError
from .methods import POLICY, PRM

ADAPTER = "default"
#: Projections that read the same input in the usual decoder blocks.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


class FusedPadModel(nn.Module):
    """Policy + unmerged PRM in one pass; call like a causal LM with an extra ``route``.

    Without ``route`` every row is a PRM row: the module is then the PRM itself.
    """

    serves = (POLICY, PRM)

    def __init__(self, policy: nn.Module, prm: Any) -> None:
        super().__init__()
        if getattr(prm, "merged", False):
            raise PrefalignError("a fused PAD model needs the PRM with its adapters unmerged (load_prm(..., merge=False))", field="prm")
        self.policy = policy
        self.config = policy.config
        self.prm_linear = prm.linear.weight.detach()
        prefix = getattr(policy, "base_model_prefix", "model")
        entries = []
        for name, layer in prm.lora_layers():
            if getattr(layer, "use_dora", {}).get(ADAPTER) or getattr(layer, "lora_bias", {}).get(ADAPTER):
                raise PrefalignError("fused PAD supports plain LoRA adapters (no DoRA, no LoRA bias)", field="prm")
            target = f"{prefix}.{name}"
            try:
                policy.get_submodule(target)
            except AttributeError as exc:
                raise PrefalignError(f"the policy has no module {target!r} matching the PRM's adapter", field="prm") from exc
            at = layer.lora_A[ADAPTER].weight.detach().t()  # [in, r]
            bt = (layer.lora_B[ADAPTER].weight.detach() * float(layer.scaling[ADAPTER])).t().contiguous()  # [r, out]
            entries.append((target, at, bt))
        # Siblings that usually read the same input (q/k/v, gate/up) share one Aᵀ product:
        # the first one called computes x·[A_q A_k A_v]ᵀ, the others take their columns if
        # they are called with the very same input tensor (else they compute their own).
        by_group: dict[tuple[str, str], list[int]] = {}
        for i, (target, at, _) in enumerate(entries):
            parent, _, child = target.rpartition(".")
            group = next((g for g in SIBLINGS if child in g), None)
            key = (parent, "/".join(group)) if group else (target, "")
            by_group.setdefault(key, []).append(i)
        #: (module name, group, column slice of the group's Aᵀ, (B·scaling)ᵀ)
        self._lora: list[tuple[str, dict[str, Any], slice, torch.Tensor]] = []
        for members in by_group.values():
            ats = [entries[i][1] for i in members]
            if len({a.shape[0] for a in ats}) != 1:  # not one input size: keep them apart
                groups = [[i] for i in members]
            else:
                groups = [members]
            for grp in groups:
                shared = {"at": torch.cat([entries[i][1] for i in grp], dim=1).contiguous(), "x": None, "version": -1, "low": None}
                start = 0
                for i in grp:
                    r = entries[i][1].shape[1]
                    self._lora.append((entries[i][0], shared, slice(start, start + r), entries[i][2]))
                    start += r

    @staticmethod
    def _add_lora(shared: dict[str, Any], cols: slice, bt: torch.Tensor, masks: dict, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        # out + (x Aᵀ ⊙ m) (B·s)ᵀ: the PRM rows get their LoRA update, the policy rows
        # (m = 0) get exactly + 0. A few small kernels per layer, whatever the row order.
        x = args[0]
        version = -1 if x.is_inference() else x._version  # inference tensors: identity only
        if shared["x"] is x and shared["version"] == version:
            low = shared["low"][:, cols]
        else:
            flat = x.reshape(-1, x.shape[-1])
            mask = masks.get(flat.shape[0])
            if mask is None:
                mask = masks[flat.shape[0]] = masks["rows"][:, None].expand(x.shape[0], flat.shape[0] // x.shape[0]).reshape(-1, 1)
            full = torch.mm(flat, shared["at"]).mul_(mask)
            shared["x"], shared["version"], shared["low"] = x, version, full
            low = full[:, cols]
        return torch.addmm(out.reshape(-1, out.shape[-1]), low, bt).view(out.shape)

    def _linear_pre_head(self, rows: torch.Tensor, called: list, module: nn.Module, args: tuple) -> tuple:
        called.append(True)
        hidden = args[0]
        mapped = F.linear(hidden.index_select(0, rows).to(self.prm_linear.dtype), self.prm_linear)
        return (hidden.index_copy(0, rows, mapped.to(hidden.dtype)), *args[1:])

    @property
    def cache_keyword(self) -> str:
        """The policy's KV-cache keyword: the module passes its keywords on to the policy."""
        return cache_keyword(self.policy)

    def forward(self, input_ids: torch.Tensor, route: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Logits of every row; ``route`` (per row, 0 = policy, 1 = PRM) defaults to all PRM,
        so that called like a causal LM this module is the PRM."""
        if route is None:
            route = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        rows = (route == 1).nonzero().flatten()
        if rows.numel() == 0:
            return self.policy(input_ids=input_ids, **kwargs)
        handles = []
        try:
            masks: dict = {"rows": (route == 1).to(self.prm_linear.dtype)}
            for target, shared, cols, bt in self._lora:
                hook = functools.partial(self._add_lora, shared, cols, bt, masks)
                handles.append(self.policy.get_submodule(target).register_forward_hook(hook))
            head = self.policy.get_output_embeddings()  # looked up per call: the fast path may replace it
            called: list = []
            handles.append(head.register_forward_pre_hook(functools.partial(self._linear_pre_head, rows, called)))
            out = self.policy(input_ids=input_ids, **kwargs)
            if not called:
                raise PrefalignError(
                    f"{type(self.policy).__name__} does not call its output embedding module; "
                    "load the PRM with fused=False (two passes)", field="prm")
            return out
        finally:
            for handle in handles:
                handle.remove()
            for _, shared, _, _ in self._lora:
                shared["x"] = shared["low"] = None  # drop the references to this call's activations
