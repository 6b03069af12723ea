"""Pairwise LLM judges against a stub OpenAI-compatible server on 127.0.0.1.

The stub (``http.server`` in a thread) decides each question by a rule on the two
answers it is shown and can be told to answer 429, 500, to stall past the client's
timeout, or to reply with a malformed verdict, so retries, re-asks, swapping, caching
and resuming are all checked against what the server actually received.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from judge_helpers import Stub, make_run

from prefalign.errors import PrefalignError
from prefalign.eval.judging import build_judges, check_judge_specs, judge_run
from prefalign.eval.llm_judge import (
    AMULET_JUDGE_PROMPT,
    AMULET_JUDGE_SYSTEM,
    AMULET_REASK,
    PairwiseLLMJudge,
    parse_llm_spec,
    parse_verdict,
)

pytest.importorskip("openai")

ANSWERS = {
    "base": ["a medium answer here", "short", "x" * 30, "same"],
    "pref": ["a much much longer answer here", "tiny", "y" * 10, "same"],
    "amulet": ["mid", "a long long answer indeed", "z" * 20, "other!"],
}


def rows_of(d: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]


def judged(d: Path, name: str) -> dict[tuple[str, str, str], Any]:
    out = {}
    for r in rows_of(d):
        for ref, entry in ((r.get("judged") or {}).get(name) or {}).get("vs", {}).items():
            out[(r["variant"], ref, r["prompt_id"])] = entry
    return out


def test_prompt_and_settings_are_amulets(tmp_path):
    with Stub() as stub:
        d = make_run(tmp_path / "run", {"pref": ["one two", "b"], "amulet": ["one", "bb"]})
        [judge] = build_judges([f"llm:{stub.url},order=random,vs=pref"], models=["stub-judge"])
        judge_run(d, [judge], progress=False)
    assert len(stub.requests) == 2  # one random-order call per pair
    body = stub.requests[0]
    assert (body["temperature"], body["max_tokens"], body["top_p"], body["seed"]) == (0, 5, 0.95, 42)
    assert body["model"] == "stub-judge"
    assert body["messages"][0] == {"role": "system", "content": AMULET_JUDGE_SYSTEM}
    user = body["messages"][1]["content"]
    assert user.startswith(AMULET_JUDGE_PROMPT.split("{question}")[0])
    assert sorted(re.findall(r'Question: """(.*?)"""', "".join(r["messages"][1]["content"] for r in stub.requests))) \
        == ["Question 0?", "Question 1?"]
    assert 'Preference: """Your answer should be concise as much as possible."""' in user


def test_swap_both_orders_and_disagreement_is_a_tie(tmp_path):
    with Stub() as stub:
        d = make_run(tmp_path / "run", ANSWERS)
        [judge] = build_judges([f"llm:{stub.url},concurrency=3"], models=["stub-judge"])
        [s] = judge_run(d, [judge], progress=False)
        got = judged(d, judge.name)
        # longer wins, consistently in both orders
        assert got[("amulet", "base", "p0")]["outcome"] == 0.0
        assert got[("amulet", "base", "p1")]["outcome"] == 1.0
        assert got[("pref", "base", "p0")]["outcome"] == 1.0
        assert got[("base", "pref", "p0")]["outcome"] == 0.0  # the mirror pair
        assert got[("pref", "base", "p3")] == {"outcome": 0.5, "status": "identical", "verdicts": []}
        assert [v["first_is_text_1"] for v in got[("amulet", "base", "p0")]["verdicts"]] == [True, False]
        # pref-vs-base and base-vs-pref are the same two questions: asked once
        texts = {json.dumps(r["messages"]) for r in stub.requests}
        assert len(texts) == len(stub.requests) == s.calls
        assert stub.max_in_flight <= 3
        assert all(a == "Bearer unused" for a in stub.auth)  # loopback without a key

    biased = Stub(rule=lambda t1, t2: "Text 1")  # position bias: the first slot always wins
    with biased:
        d2 = make_run(tmp_path / "biased", ANSWERS)
        [judge] = build_judges([f"llm:{biased.url}"], models=["stub-judge"])
        judge_run(d2, [judge], progress=False)
        entries = [e for e in judged(d2, judge.name).values() if e["status"] != "identical"]
        assert entries and all(e["outcome"] == 0.5 and e["status"] == "disagree" for e in entries)


def test_retries_on_429_500_and_timeouts(tmp_path):
    with Stub() as stub:
        d = make_run(tmp_path / "run", {"pref": ["one two"], "amulet": ["one"]})
        stub.faults = ["429", "500", "stall"]
        [judge] = build_judges([f"llm:{stub.url},concurrency=1,timeout=0.5,retries=4,vs=pref"], models=["m"])
        [s] = judge_run(d, [judge], progress=False)
        entry = judged(d, judge.name)[("amulet", "pref", "p0")]
        assert entry["status"] == "ok" and entry["outcome"] == 0.0
        assert len(stub.requests) == 3 + 2  # three failures retried, then both orders
        assert s.errors == 0

        # retries exhausted: recorded as an error, not cached, retried (and won) next run
        stub.faults = ["500"] * 10
        d2 = make_run(tmp_path / "run2", {"pref": ["one two"], "amulet": ["one"]})
        [judge] = build_judges([f"llm:{stub.url},concurrency=1,retries=1,vs=pref"], models=["m"])
        [s] = judge_run(d2, [judge], progress=False)
        failed = judged(d2, judge.name)[("amulet", "pref", "p0")]
        assert s.errors == 1 and failed["status"] == "error" and failed["outcome"] is None
        stub.faults = []
        judge_run(d2, [judge], progress=False)
        assert judged(d2, judge.name)[("amulet", "pref", "p0")]["outcome"] == 0.0


def test_malformed_verdicts_are_reasked_then_recorded_never_guessed(tmp_path):
    with Stub() as stub:
        d = make_run(tmp_path / "run", {"pref": ["one two"], "amulet": ["one"]})
        # first call: malformed, then fine on the re-ask; second call: malformed twice
        stub.faults = ["malformed", None, "prose", "prose"]
        [judge] = build_judges([f"llm:{stub.url},concurrency=1,vs=pref,reask=1"], models=["m"])
        [s] = judge_run(d, [judge], progress=False)
        assert stub.requests[1]["messages"][-1]["content"].endswith(AMULET_REASK)
        entry = judged(d, judge.name)[("amulet", "pref", "p0")]
        assert entry["outcome"] is None and entry["status"] == "malformed"
        assert ["Both are fine", "Both are fine"] in [v.get("replies") for v in entry["verdicts"]]
        assert s.malformed == 1
        n = len(stub.requests)
        judge_run(d, [judge], progress=False)  # malformed is final: not asked again
        assert len(stub.requests) == n


def test_resume_after_interruption_judges_nothing_twice(tmp_path, monkeypatch):
    with Stub() as stub:
        full = make_run(tmp_path / "full", ANSWERS)
        stub.delay = 0.02  # requests overlap: some are in flight when the run is interrupted
        [judge] = build_judges([f"llm:{stub.url},concurrency=3"], models=["m"])
        judge_run(full, [judge], progress=False)
        expected = judged(full, judge.name)
        unique_calls = len(stub.requests)
        stub.requests.clear()

        d = make_run(tmp_path / "interrupted", ANSWERS)
        real_ask = PairwiseLLMJudge.ask
        count = {"n": 0}

        def flaky_ask(self, call, messages):
            count["n"] += 1
            if count["n"] == 4:
                raise KeyboardInterrupt
            return real_ask(self, call, messages)

        monkeypatch.setattr(PairwiseLLMJudge, "ask", flaky_ask)
        with pytest.raises(KeyboardInterrupt):
            judge_run(d, [judge], progress=False)
        monkeypatch.setattr(PairwiseLLMJudge, "ask", real_ask)
        first = len(stub.requests)
        assert 0 < first < unique_calls
        partial = judged(d, judge.name)
        assert partial and len(partial) < len(expected)  # rows hold what was judged before the stop
        judge_run(d, [judge], progress=False)
        assert len(stub.requests) == unique_calls  # resumed: every question asked exactly once overall
        assert len({json.dumps(r["messages"]) for r in stub.requests}) == unique_calls
        assert judged(d, judge.name) == expected
        # a third run costs nothing
        judge_run(d, [judge], progress=False)
        assert len(stub.requests) == unique_calls


def test_key_from_env_is_used_and_never_written(tmp_path, monkeypatch):
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    with Stub() as stub:
        d = make_run(tmp_path / "run", ANSWERS)
        [judge] = build_judges([f"llm:{stub.url},key_env=MY_JUDGE_KEY"], models=["m"])
        assert secret not in repr(judge) and secret not in judge.name
        [s] = judge_run(d, [judge], progress=False)
        assert stub.auth and all(a == f"Bearer {secret}" for a in stub.auth)
    from prefalign.eval.report import write_report

    write_report(d, plots=False)
    for path in d.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path
    cfg = json.loads((d / "config.json").read_text())
    record = cfg["judges"][judge.name]
    assert record["key_env"] == "MY_JUDGE_KEY"
    assert record["usage"] == {"prompt_tokens": 100 * s.calls, "completion_tokens": 3 * s.calls,
                               "total_tokens": 103 * s.calls}


def test_missing_key_and_unreachable_endpoint_fail_fast(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(PrefalignError, match=r"no API key in \$OPENAI_API_KEY"):
        check_judge_specs(["llm:https://api.example.invalid/v1"], models=["gpt-4o"], reach=False)
    with pytest.raises(PrefalignError, match="cannot reach"):
        check_judge_specs(["llm:http://127.0.0.1:9/v1"], models=["m"])  # discard port: refused
    with pytest.raises(PrefalignError, match="needs a model name"):
        check_judge_specs(["llm:http://127.0.0.1:9/v1"])
    with pytest.raises(PrefalignError, match="not an http"):
        parse_llm_spec("127.0.0.1:8000", model="m")
    with pytest.raises(PrefalignError, match="unknown judge"):
        check_judge_specs(["gpt4"])


def test_parse_verdict_accepts_only_amulets_spellings():
    for ok, v in (("Text 1", "Text 1"), ("[Text 2]", "Text 2"), ("Tie.", "Tie"), (" Text 1.\n", "Text 1")):
        assert parse_verdict(ok) == v
    for bad in ("text 1", "Text 3", "Text 1 is better", "", None, "Text", "TIE"):
        assert parse_verdict(bad) is None


def test_report_shows_each_judge_and_their_agreement(tmp_path):
    from prefalign.eval.report import write_report

    with Stub() as stub:
        d = make_run(tmp_path / "run", ANSWERS)
        [judge] = build_judges([f"llm:{stub.url}"], models=["stub-judge"])
        judge_run(d, [judge], progress=False)
    md = write_report(d, plots=False).read_text()
    section = md.split("## Judges compared", 1)[1].split("\n## ", 1)[0]
    assert f"`{judge.name}`" in section and "`proxy`" in section
    # proxy (concise: fewer words wins) vs the stub (longer text wins), recomputed here
    def outcome(a: float, b: float) -> float:
        return 1.0 if a > b else 0.5 if a == b else 0.0

    same = total = 0
    for ref in ("pref", "base"):
        for v in ANSWERS:
            if v == ref:
                continue
            for t, u in zip(ANSWERS[v], ANSWERS[ref]):
                proxy = outcome(-len(t.split()), -len(u.split()))
                llm = 0.5 if t == u else outcome(len(t), len(u))
                same += proxy == llm
                total += 1
    agreement = section.split("### Agreement between judges", 1)[1]
    row = next(line for line in agreement.splitlines() if line.startswith("| `proxy` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["`proxy`", f"`{judge.name}`", str(total), f"{same / total:.0%}"]
    assert cells[5] == "–"  # an LLM judge has no per-answer scores
    per_judge = section.split("### Win rate against `base`, per judge", 1)[1]
    header = [c.strip() for c in per_judge.strip().splitlines()[0].strip("|").split("|")]
    assert header == ["method", "`proxy`", f"`{judge.name}`"]
    assert f"{100 * len(stub.requests)} + {3 * len(stub.requests)}" in section  # token usage summed


def test_prefalign_serve_as_the_judge(tmp_path, tokenizer):
    """The project's own server on loopback, a tiny random model as the judge: every reply
    is what the engine decodes greedily for that question, recorded as is (a random model
    mostly answers nonsense: malformed, never turned into a verdict)."""
    pytest.importorskip("uvicorn")
    from conftest import _tiny_llama
    from test_server import LiveServer

    from prefalign import Aligner
    from prefalign.eval.llm_judge import parse_verdict
    from prefalign.server import create_app

    tiny = _tiny_llama(len(tokenizer), max_positions=2048)
    app = create_app(Aligner(tiny, tokenizer), model_id="tiny", default_method="base")
    d = make_run(tmp_path / "run", {"pref": ["one two", "three"], "amulet": ["four", "five six"]})
    with LiveServer(app) as server:
        [judge] = build_judges([f"llm:{server.url}/v1,vs=pref,reask=0,concurrency=2"], models=["tiny"])
        [s] = judge_run(d, [judge], progress=False)
    assert s.items == 2 and s.calls == 4 and s.errors == 0
    reference = Aligner(tiny, tokenizer)
    log = [json.loads(line) for line in next((d / "judges").glob("*.jsonl")).read_text().splitlines()]
    assert len(log) == 4
    for row in [r for r in rows_of(d) if r["variant"] == "amulet"]:
        entry = row["judged"][judge.name]["vs"]["pref"]
        other = next(r for r in rows_of(d) if r["variant"] == "pref" and r["prompt_id"] == row["prompt_id"])
        for first_is_1 in (True, False):
            t1, t2 = (row["text"], other["text"]) if first_is_1 else (other["text"], row["text"])
            _, messages = judge.request(row["prompt"], row["preference_text"], t1, t2)
            want = reference.generate([messages], method="base", max_new_tokens=5, temperature=0)[0].text
            got = next(e for e in log if e["call"] == judge.request(row["prompt"], row["preference_text"], t1, t2)[0])
            assert got["replies"] == [want]
            assert got["status"] == ("ok" if parse_verdict(want) else "malformed")
        assert entry["status"] in ("ok", "disagree", "malformed")
    usage = json.loads((d / "config.json").read_text())["judges"][judge.name]["usage"]
    assert usage["completion_tokens"] <= 4 * 5 and usage["prompt_tokens"] > 4 * 100


def test_pair_selection_options_do_not_change_the_judge(tmp_path):
    with Stub() as stub:
        d = make_run(tmp_path / "run", ANSWERS)
        [some] = build_judges([f"llm:{stub.url},vs=pref,methods=amulet"], models=["m"])
        [s] = judge_run(d, [some], progress=False)
        assert s.items == 4 and set(judged(d, some.name)) == {("amulet", "pref", f"p{i}") for i in range(4)}
        asked = len(stub.requests)
        [every] = build_judges([f"llm:{stub.url}"], models=["m"])
        assert every.name == some.name  # same judge: the amulet-vs-pref verdicts are reused
        [t] = judge_run(d, [every], progress=False)
        # cached: the 4 amulet-vs-pref pairs, and amulet-vs-base on p3, where base's answer is pref's
        assert t.items == 16 and t.cached == 5
        # new questions: 16 pairs - 5 cached - 2 identical (p3 base/pref) - 3 mirrors of pref-vs-base
        assert len(stub.requests) - asked == t.calls == 2 * (16 - 5 - 2 - 3)
