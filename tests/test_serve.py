"""`lorax-lite serve` starts the HTTP server on a model and a registry; a real client reaches it over TCP."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from lorax_lite.cli import app
from lorax_lite.config import EngineConfig, ServerLimits
from server_helpers import free_port, serve

# serve's options built from the configs' fields: every EngineConfig field but model (that is --model), every ServerLimits one
CONFIG_FIELDS = [f for f in dataclasses.fields(EngineConfig) if f.name != "model"] + list(dataclasses.fields(ServerLimits))


@pytest.fixture
def server(tiny_llama_dir, tmp_path):
    with serve("--model", str(tiny_llama_dir), "--registry", f"sqlite:///{tmp_path / 'registry.db'}",
               "--served-model-name", "tiny", "--dtype", "float32", "--device", "cpu") as base:
        yield base


def test_serve_answers_health_info_and_generate(server):
    info = httpx.get(f"{server}/info").json()
    assert info["model_id"] == "tiny"
    resp = httpx.post(f"{server}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True}}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["details"]["generated_tokens"] >= 1
    unknown = httpx.post(f"{server}/generate", json={"inputs": "Hello"}, headers={"adapter_id": "nope"}, timeout=30)
    assert unknown.status_code == 404


def test_serve_refuses_bad_options_with_exit_code_2(tiny_llama_dir, tmp_path):
    cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", "--model", str(tiny_llama_dir), "--port", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--port" in result.stderr
    cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", "--model", str(tmp_path / "missing"), "--registry",
           f"sqlite:///{tmp_path / 'r.db'}", "--port", str(free_port())]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
    cmd = [sys.executable, "-m", "lorax_lite.cli", "serve", "--model", str(tiny_llama_dir), "--registry",
           f"sqlite:///{tmp_path / 'r.db'}", "--port", str(free_port()), "--num-kv-blocks", "2", "--block-size", "4",
           "--max-model-len", "64"]  # valid settings each, but the cache they ask for cannot hold one sequence
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--max-model-len 64 does not fit in the KV cache" in result.stderr and "--num-kv-blocks" in result.stderr


def test_a_full_queue_answers_429_with_retry_after_and_the_server_stays_healthy(tiny_llama_dir, tmp_path):
    """One sequence at a time and one waiting request allowed: a burst gets some 429s, the rest succeed."""
    args = ("--model", str(tiny_llama_dir), "--registry", f"sqlite:///{tmp_path / 'registry.db'}", "--dtype", "float32",
            "--device", "cpu", "--max-num-seqs", "1", "--max-queued-requests", "1")
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 60, "ignore_eos_token": True}}

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(*(client.post("/generate", json=body) for _ in range(12)))

    with serve(*args) as base:
        responses = asyncio.run(burst(base))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error_type"] == "overloaded"
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.post(f"{base}/generate", json=body, timeout=120).status_code == 200


@pytest.fixture(scope="module")
def serve_help() -> str:
    env = {**os.environ, "TERMINAL_WIDTH": "400", "COLUMNS": "400"}  # one option per line
    result = subprocess.run([sys.executable, "-m", "lorax_lite.cli", "serve", "--help"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("field", CONFIG_FIELDS, ids=lambda f: f.name)
def test_serve_help_lists_each_config_field_with_its_default_and_help(serve_help: str, field: dataclasses.Field) -> None:
    option = "--" + field.name.replace("_", "-")
    lines = [line for line in serve_help.splitlines() if option in line.split()]
    assert len(lines) == 1, f"{option} not in serve --help:\n{serve_help}"
    assert field.metadata["help"] in lines[0]
    if field.default is None:  # no default shown; the help says what happens
        assert "[default:" not in lines[0]
    elif isinstance(field.default, bool):  # a switch: `--x/--no-x`, its default shown as the flag that is on
        assert f"--no-{option[2:]}" in lines[0].split()
        assert f"[default: {option[2:] if field.default else 'no-' + option[2:]}]" in lines[0]
    else:
        assert f"[default: {field.default}]" in lines[0]


@pytest.mark.parametrize("args, option", [
    (["--max-loras", "-1"], "--max-loras"),
    (["--max-cpu-loras", "4"], "--max-cpu-loras"),  # fewer than --max-loras (8)
    (["--block-size", "0"], "--block-size"),
    (["--num-kv-blocks", "0"], "--num-kv-blocks"),
    (["--kv-cache-memory-gb", "0"], "--kv-cache-memory-gb"),
    (["--max-model-len", "1"], "--max-model-len"),
    (["--device", "cuda:x"], "--device"),
    (["--dtype", "fp16"], "--dtype"),
    (["--max-queued-requests", "0"], "--max-queued-requests"),
    (["--max-body-bytes", "10"], "--max-body-bytes"),
])
def test_a_bad_config_option_exits_2_naming_it_before_anything_is_opened(tmp_path, args: list[str], option: str) -> None:
    """The model path does not exist: an error about it, or a registry file, would mean the config came too late."""
    registry = tmp_path / "registry.db"
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing"), "--registry", f"sqlite:///{registry}",
                                      "--port", str(free_port()), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {option} ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "_" not in result.stderr.split(" got ")[0], result.stderr  # options, not field names
    assert not registry.exists()


# ---- several replicas on Ray Serve: refused before anything is opened or loaded -----------------------------


@pytest.mark.parametrize("args, message", [
    (["--num-replicas", "2"], "--registry redis://"),  # a SQLite file cannot be shared by replicas on several nodes
    (["--num-replicas", "0"], "--num-replicas "),
    (["--num-replicas", "-1", "--ray-address", "auto"], "--num-replicas "),
    (["--num-replicas", "2", "--replica-cpus", "0"], "--replica-cpus "),
    (["--num-replicas", "2", "--replica-gpus", "-1"], "--replica-gpus "),
    (["--num-replicas", "2", "--max-ongoing-requests", "0"], "--max-ongoing-requests "),
    (["--ray-address", "auto", "--max-models-per-replica", "0"], "--max-models-per-replica "),
    (["--replica-gpus", "1"], "--replica-gpus: only with several replicas"),  # one process: no Ray to give them to
    (["--replica-cpus", "2", "--max-ongoing-requests", "8"], "--replica-cpus, --max-ongoing-requests: only with"),
])
def test_bad_replica_options_exit_2_before_anything_is_opened(tmp_path, args: list[str], message: str) -> None:
    registry = tmp_path / "registry.db"
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing"), "--registry",
                                      f"sqlite:///{registry}", "--port", str(free_port()), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not registry.exists()


def test_replicas_without_ray_installed_say_how_to_install_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing"), "--registry",
                                      "redis://localhost:1/0", "--port", str(free_port()), "--num-replicas", "2"])
    assert result.exit_code == 2, result.output
    assert "pip install 'lorax-lite[cluster]'" in result.stderr, result.stderr
