"""Dataset loading for `prefalign eval`: the three formats, field detection, ids, subsampling."""

from __future__ import annotations

import json

import pytest

from prefalign.errors import PrefalignError
from prefalign.eval.datasets import detect_field, load_dataset, load_datasets, subsample


def test_shared_amulet_json(shared_data):
    ds = load_dataset(shared_data / "amulet" / "HelpSteer_train.json")
    assert ds.name == "HelpSteer_train" and ds.field == "question"
    assert len(ds) == ds.total == 1236
    assert ds.items[0].id == "0" and ds.items[0].prompt.startswith("What are the three most important")


def test_shared_psoups_json_ids(shared_data):
    ds = load_dataset(shared_data / "psoups" / "koala_eval_50.json")
    assert ds.field == "prompt" and len(ds) == 50
    assert ds.items[0].id == "0" and "TCP/IP" in ds.items[0].prompt


def test_shared_truthfulqa_csv(shared_data):
    ds = load_dataset(shared_data / "truthfulqa" / "TruthfulQA.csv", limit=5, seed=1)
    assert ds.field == "Question" and ds.total == 817 and len(ds) == 5
    # no id column: ids are row numbers, and the subsample keeps file order
    ids = [int(i.id) for i in ds.items]
    assert ids == sorted(ids)


def test_all_shared_amulet_files_load(shared_data):
    paths = sorted((shared_data / "amulet").glob("*.json"))
    loaded = load_datasets(paths, limit=3)
    assert [len(d) for d in loaded] == [3, 3, 3, 3]
    assert all(d.field == "question" for d in loaded)


def test_jsonl_and_field_option(tmp_path):
    p = tmp_path / "x.jsonl"
    rows = [{"id": 7, "instruction": "Say hi.", "text": "other"}, {"instruction": "Say bye."}, {"instruction": "  "}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_dataset(p)
    assert ds.field == "instruction"
    assert [(i.id, i.prompt) for i in ds.items] == [("7", "Say hi."), ("1", "Say bye.")]  # empty prompt skipped
    assert load_dataset(p, field="text").items[0].prompt == "other"
    with pytest.raises(PrefalignError, match="no field 'nope'.*instruction"):
        load_dataset(p, field="nope")


def test_detection_errors_and_fallbacks(tmp_path):
    with pytest.raises(PrefalignError, match="cannot find the prompt field.*--field"):
        detect_field([{"body": "x"}])
    assert detect_field([{"PROMPT": "x"}]) == "PROMPT"  # case-insensitive fallback
    assert detect_field(["a", "b"]) == ""  # a list of strings is a list of prompts
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": [{"question": "q1"}, {"question": "q2"}]}))
    assert len(load_dataset(p)) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PrefalignError, match="not valid JSON"):
        load_dataset(bad)
    with pytest.raises(PrefalignError, match="not found"):
        load_dataset(tmp_path / "missing.json")


def test_duplicate_ids_made_unique(tmp_path):
    p = tmp_path / "dup.json"
    p.write_text(json.dumps([{"id": "a", "prompt": "1"}, {"id": "a", "prompt": "2"}]))
    assert [i.id for i in load_dataset(p).items] == ["a", "a#1"]


def test_subsample_deterministic_and_nested():
    assert subsample(100, 10, seed=3) == subsample(100, 10, seed=3)
    assert subsample(100, 10, seed=3) != subsample(100, 10, seed=4)
    small, large = set(subsample(100, 5, seed=3)), set(subsample(100, 20, seed=3))
    assert small <= large  # raising --limit keeps earlier prompts (and their rows)
    assert subsample(5, None) == subsample(5, 50) == [0, 1, 2, 3, 4]
    with pytest.raises(PrefalignError):
        subsample(10, 0)


def test_same_stem_names_disambiguated(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test.json").write_text(json.dumps([{"prompt": "p"}]))
    names = [d.name for d in load_datasets([tmp_path / "a" / "test.json", tmp_path / "b" / "test.json"])]
    assert names == ["a/test", "b/test"]
