"""Methods read named inputs (``ContextScores``) and declare what the server needs (issue #14)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
import torch

from prefalign.methods import (
    METHODS,
    PARAM_ALIASES,
    POLICY,
    PRM,
    Amulet,
    Beam,
    ContextRole,
    ContextScores,
    LinearAlignment,
    Method,
    Pad,
    Pref,
    make_method,
    plausibility_mask,
    register,
)
from prefalign.methods.method import RoleLayout


def _stacked(n: int, k: int, v: int = 7) -> torch.Tensor:
    # Row j of context i is filled with 100·i + j, so every slice says where it came from.
    return (100 * torch.arange(k)[None, :, None] + torch.arange(n)[:, None, None]).float().expand(n, k, v).clone()


def _view(method: Method, n_preferences: int, n: int = 3) -> tuple[ContextScores, torch.Tensor]:
    roles = method.roles(n_preferences)
    lp = _stacked(n, len(roles))
    return ContextScores(lp, torch.ones(n_preferences), RoleLayout.of(roles)), lp


def _context_of(t: torch.Tensor) -> list[int]:
    """The context index each ``[n, P, V]`` slot was cut from."""
    return [int(x) // 100 for x in t[0, :, 0]]


def test_contrastive_roles_map_to_base_and_preferences():
    for method in (LinearAlignment(), Amulet()):
        view, lp = _view(method, 3)
        assert torch.equal(view.base, lp[:, 0])
        assert _context_of(view.preferences) == [1, 2, 3]
        assert view.preferences.data_ptr() == lp[:, 1:].data_ptr()  # a view, not a copy
        with pytest.raises(LookupError):
            view.reward


def test_pref_has_no_base_and_its_preferences_are_everything():
    view, lp = _view(Pref(), 2)
    assert view.base is None
    assert torch.equal(view.preferences, lp)


def test_pad_roles_with_several_preferences_and_a_candidate_template():
    view, lp = _view(Pad(candidate_template="default"), 3)
    assert view.base is None
    assert _context_of(view.preferences) == [0, 1, 2]
    assert _context_of(view.reward) == [3, 4, 5]
    assert _context_of(view.candidates) == [6, 7, 8]
    plain, _ = _view(Pad(), 2)
    assert _context_of(plain.reward) == [2, 3]
    with pytest.raises(LookupError):
        plain.candidates


def test_roles_out_of_order_are_gathered_by_preference():
    roles = [ContextRole(1, PRM), ContextRole(None), ContextRole(0, PRM), ContextRole(1), ContextRole(0)]
    lp = _stacked(2, len(roles))
    view = ContextScores(lp, torch.ones(2), RoleLayout.of(roles))
    assert _context_of(view.reward) == [2, 0]
    assert _context_of(view.preferences) == [4, 3]
    assert torch.equal(view.base, lp[:, 1])
    assert view.n_preferences == 2


def test_weighted_is_the_weighted_mean_over_preferences():
    lp = torch.log_softmax(torch.randn(4, 3, 9, dtype=torch.float64), -1)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    view = ContextScores(lp, w, RoleLayout.of(LinearAlignment().roles(2)))
    assert torch.allclose(view.weighted(view.preferences), 0.25 * lp[:, 1] + 0.75 * lp[:, 2])


def test_score_checks_the_number_of_contexts():
    with pytest.raises(ValueError, match="reads 3 contexts, got 2"):
        Amulet().score(torch.zeros(1, 2, 5), torch.ones(2))


def test_pad_plausibility_is_the_shared_rule():
    torch.manual_seed(0)
    policy = torch.log_softmax(torch.randn(5, 1, 50), -1)
    prm = torch.log_softmax(torch.randn(5, 1, 50), -1)
    stacked = torch.cat([policy, prm], 1)
    one = torch.ones(1)
    floored = Pad(w=2.0, k=10, plausibility=0.3).score(stacked, one)
    plain = Pad(w=2.0, k=10, plausibility=0.0).score(stacked, one)
    # The floor drops exactly the candidates plausibility_mask drops with the policy as reference.
    expected = plausibility_mask(plain, policy[:, 0], 0.3)
    assert torch.equal(floored, expected)


def test_methods_declare_aliases_cost_limits_and_determinism():
    assert Amulet.aliases == {"lambda": "lam", "T": "iterations", "t": "iterations"}
    assert Pad.aliases["min_p"] == "plausibility"
    assert Amulet.cost_limits == {"iterations": 1000} and Beam.cost_limits == {"width": 16}
    assert Pref.cost_limits == {} and LinearAlignment.cost_limits == {}
    for cls in METHODS.values():
        assert set(cls.aliases.items()) <= set(PARAM_ALIASES.items())
    assert Beam(width=4).deterministic and not Beam(width=1).deterministic and not Amulet().deterministic
    assert make_method("amulet", **{"lambda": 1.0}).lam == 1.0


# --- the server reads what a method declares ---------------------------------------------------

pytest.importorskip("uvicorn")


@dataclass(frozen=True)
class Deep(Method):
    """A toy method whose ``depth`` the server must cap, declared by the method alone."""

    name = "deep-test"
    summary = "test: declares a cost limit"
    needs_preference = False
    aliases = {"d": "depth"}
    cost_limits = {"depth": 4}
    depth: int = 1

    def roles(self, n_preferences):
        return [ContextRole(None, POLICY)]

    def combine(self, scores):
        return scores.base


@pytest.fixture(scope="module")
def deep_server(tokenizer):
    from conftest import _tiny_llama
    from test_server import LiveServer

    from prefalign import Aligner
    from prefalign.server import create_app

    aliases = dict(PARAM_ALIASES)
    register(Deep)
    try:
        with LiveServer(create_app(Aligner(_tiny_llama(len(tokenizer), max_positions=512), tokenizer), model_id="tiny")) as live:
            yield live
    finally:
        del METHODS[Deep.name]
        PARAM_ALIASES.clear()
        PARAM_ALIASES.update(aliases)


def _post(server, alignment):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
            "alignment": alignment}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_server_enforces_a_registered_methods_cost_limit(deep_server):
    ok = _post(deep_server, {"method": "deep-test", "depth": 4})
    assert ok.status_code == 200, ok.text
    over = _post(deep_server, {"method": "deep-test", "depth": 5})
    assert over.status_code == 400
    assert over.json()["error"] == {
        "message": "depth is 5; this server allows at most 4", "type": "invalid_request_error",
        "param": "alignment.depth", "code": "invalid_value",
    }
    # Through the method's own alias the cap still holds.
    assert _post(deep_server, {"method": "deep-test", "d": 9}).status_code == 400
