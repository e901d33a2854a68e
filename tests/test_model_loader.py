"""model_loader: dtype/device resolution, HF directories, GGUF files, and the errors at the boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorax_lite import model_loader
from lorax_lite.config import DEFAULT_MODEL_DIR
from lorax_lite.model_loader import load_model_and_tokenizer, resolve_device, resolve_dtype

CPU = torch.device("cpu")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")


@pytest.mark.parametrize(
    "name, expected",
    [("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_resolve_dtype_on_cpu(name: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name, CPU) is expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_dtype_auto_on_cuda_is_half_precision() -> None:
    assert resolve_dtype("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("name", ["fp32", "float64", "", "int8"])
def test_resolve_dtype_rejects_unknown(name: str) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype(name, CPU)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ValueError, match="device must be"):
            resolve_device(bad)


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(device: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(device)


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("auto", torch.float32)])
def test_load_hf_directory_in_dtype(tiny_llama_dir: Path, dtype: str, expected: torch.dtype) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}
    assert {p.device for p in model.parameters()} == {CPU}
    assert not model.training
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.config.vocab_size == len(tokenizer)


def test_load_qwen2_directory(tiny_qwen2_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_qwen2_dir), dtype="float32", device="cpu")
    assert model.config.model_type == "qwen2"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bad_dtype_is_rejected_before_loading(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model_and_tokenizer(str(tiny_llama_dir), dtype="fp16", device="cpu")


def test_missing_default_model_says_to_fetch_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default directory is relative; make sure it is absent
    with pytest.raises(FileNotFoundError, match="lorax-lite fetch-model"):
        load_model_and_tokenizer(DEFAULT_MODEL_DIR, device="cpu")


@pytest.mark.parametrize("path", ["./nope", "/nonexistent/model", "missing.gguf", "a/b/c"])
def test_missing_local_path_says_to_check_it(path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="check the path"):
        load_model_and_tokenizer(path, device="cpu")


def test_directory_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path), device="cpu")


@pytest.mark.parametrize("hub_id", ["org/name", "gpt2"])
def test_hub_id_failure_is_wrapped(hub_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(OSError, match=rf"could not load '{hub_id}'.*couldn't connect") as info:
        load_model_and_tokenizer(hub_id, device="cpu")
    assert "\n" not in str(info.value)


def test_load_gguf_matches_the_original(tiny_llama_gguf: Path, tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_gguf), dtype="float32", device="cpu")
    reference, reference_tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), dtype="float32", device="cpu")
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert not model.training
    state, reference_state = model.state_dict(), reference.state_dict()
    assert state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    text = "What is the capital of France? héllo 😀"
    assert tokenizer.encode(text) == reference_tokenizer.encode(text)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == reference_tokenizer.chat_template


def test_load_gguf_in_bfloat16_and_save_as_a_plain_model(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    model, _ = load_model_and_tokenizer(str(tiny_llama_gguf), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "saved")  # raises for a model still marked as GGUF-quantized
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_directory_with_one_gguf_file_loads_it(tiny_llama_gguf: Path) -> None:
    model, _ = load_model_and_tokenizer(str(tiny_llama_gguf.parent), dtype="float32", device="cpu")
    assert model.config.num_hidden_layers == 2


def test_as_plain_model_keeps_generation_config(tiny_llama_dir: Path) -> None:
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir), dtype="float32", device="cpu")
    plain = model_loader.as_plain_model(model, torch.float32)
    assert plain is not model
    assert plain.generation_config.eos_token_id == model.generation_config.eos_token_id
