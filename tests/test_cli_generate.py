"""`lorax-lite generate`: offline generation from the command line; bad input exits 2."""

from __future__ import annotations

import dataclasses

import typer
from typer.testing import CliRunner

from lorax_lite.cli import app
from lorax_lite.config import EngineConfig

runner = CliRunner()


def test_generate_prints_text(tiny_llama_dir):
    result = runner.invoke(app, ["generate", "Hello", "--model", str(tiny_llama_dir), "--no-chat", "--max-tokens", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_generate_chat_on_tiny_model(tiny_llama_dir):
    result = runner.invoke(app, ["generate", "What is the capital of France?", "--model", str(tiny_llama_dir), "--max-tokens", "4"])
    assert result.exit_code == 0, result.output


def test_bad_input_exits_2_with_a_message(tiny_llama_dir):
    for args, message in (
        (["generate", "  "], "prompt is empty"),
        (["generate", "hi", "--model", str(tiny_llama_dir), "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--model", str(tiny_llama_dir), "--max-tokens", "0"], "max_tokens"),
        (["generate", "hi", "--model", "./no/such/model"], "check the path"),
        (["generate", "hi", "--model", str(tiny_llama_dir), "--dtype", "int3"], "dtype"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)


def test_dtype_and_device_come_from_the_engine_config(tiny_llama_dir):
    result = runner.invoke(app, ["generate", "hi", "--model", str(tiny_llama_dir), "--device", "cuda:x"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --device must be one of"), result.stderr
    options = {param.name: param for param in typer.main.get_command(app).commands["generate"].params}
    for name in ("dtype", "device"):
        field = next(f for f in dataclasses.fields(EngineConfig) if f.name == name)
        assert options[name].opts == [f"--{name}"]
        assert (options[name].default, options[name].help) == (field.default, field.metadata["help"])
