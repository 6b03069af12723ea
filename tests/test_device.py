"""--device / --dtype: resolved before anything loads, with errors that name the field."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.errors import PrefalignError
from prefalign.models import resolve_device, resolve_dtype


def test_auto_device_and_dtype():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # the CUDA default
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16


@pytest.mark.parametrize(("device", "dtype", "field"), [("tpu", "auto", "device"), ("cpu", "int8", "dtype")])
def test_bad_values_name_the_field(device, dtype, field):
    with pytest.raises(PrefalignError) as info:
        resolve_dtype(dtype, resolve_device(device))
    assert info.value.field == field


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_loading():
    from prefalign import Aligner

    with pytest.raises(PrefalignError, match="no CUDA") as info:
        Aligner.from_pretrained("/nonexistent/model", device="cuda")  # refused before the (failing) load
    assert info.value.field == "device"


def test_cli_refuses_a_bad_device_with_exit_2():
    result = CliRunner().invoke(app, ["generate", "Hi", "--device", "tpu", "--model", "/nonexistent/model"])
    assert result.exit_code == 2
    assert "device" in result.output
