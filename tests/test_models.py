"""Model loading: local directories, GGUF conversion cache, clear errors offline."""

from __future__ import annotations

import pytest

from prefalign.errors import ModelLoadError
from prefalign.models import load_model, resolve_model_source, tokenizer_fingerprint


def test_local_directory_round_trip(tmp_path, tiny_llama, tokenizer):
    tiny_llama.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    model, tok = load_model(tmp_path / "tiny")
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert model.config.num_hidden_layers == 2
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tokenizer)


def test_embedded_gguf_is_converted_once_and_cached(tokenizer):
    first, _ = resolve_model_source(None)
    stamp = (first and __import__("pathlib").Path(first, "config.json").stat().st_mtime)
    second, _ = resolve_model_source("embedded")
    assert first == second
    assert __import__("pathlib").Path(second, "config.json").stat().st_mtime == stamp


def test_missing_paths_and_offline_hub_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("./no/such/model")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")
    # huggingface_hub reads HF_HUB_OFFLINE at import; patch the constant so no connection is tried.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="hub"):
        load_model("some-org/some-model-that-is-not-cached")


def test_fingerprint_detects_a_different_vocabulary(tokenizer):
    import copy

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_token_for_test>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


def test_gguf_tokenizer_reads_the_tokenizer_without_converting_weights(tmp_path, monkeypatch):
    from prefalign.models import embedded_gguf_path, gguf_tokenizer, load_tokenizer, tokenizer_fingerprint

    expected = tokenizer_fingerprint(load_tokenizer())  # from the usual (converted) cache
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    tokenizer = gguf_tokenizer(embedded_gguf_path())
    assert tokenizer_fingerprint(tokenizer) == expected
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert not list(tmp_path.rglob("*.safetensors"))  # no weights were converted
    (cached,) = (tmp_path / "tokenizers").iterdir()
    assert (cached / "tokenizer_config.json").is_file()
    assert tokenizer_fingerprint(gguf_tokenizer(embedded_gguf_path())) == expected  # from that cache
