"""Load the base model and its tokenizer: a local HF directory, a `.gguf` file, or a hub id.

GGUF weights are dequantized at load and the result is rebuilt as a plain model (no
`quantization_config`, no quantizer attached), so the rest of the engine never sees the difference.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorax_lite.config import DEFAULT_MODEL_DIR, check_device, check_dtype

_HUB_ID = re.compile(r"^\w[\w.-]*(/[\w.-]+)?$")  # "gpt2", "org/name"


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu"; "cuda" / "cuda:N" only when CUDA (and device N) exists.

    The name itself is checked by `config.check_device`, here too since scripts pass plain strings.
    """
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    return _check_cuda(torch.device(device))


def _check_cuda(device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; use --device cpu (or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist; "
                         f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> float32 on CPU, bfloat16 on CUDA when supported else float16; or the named dtype.

    The name itself is checked by `config.check_dtype`, here too since scripts pass plain strings.
    """
    check_dtype(dtype)
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)  # config.DTYPES other than "auto" are torch's names


def load_model_and_tokenizer(
    model: str, dtype: str = "auto", device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `model` (HF directory, `.gguf` file or hub id) in eval mode, on `device`, in `dtype`.

    Raises ValueError for a bad dtype or device, FileNotFoundError for a local path that does not
    exist (or holds no model), OSError when a hub id cannot be loaded.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_model_path(model)
    path = Path(model).expanduser()
    if path.exists():
        hf_model, tokenizer = _load_local(path, torch_dtype)
    else:
        hf_model, tokenizer = _load_from_hub(model, torch_dtype)
    # transformers wraps .to() in a decorator that mypy sees unbound
    return hf_model.to(torch_device).eval(), tokenizer  # type: ignore[arg-type]


def check_model_path(model: str) -> None:
    """FileNotFoundError when `model` names a local path that does not exist (a hub id is not checked here)."""
    if not Path(model).expanduser().exists() and _looks_like_local_path(model):
        raise FileNotFoundError(_missing_path_message(model))


def _looks_like_local_path(model: str) -> bool:
    if model.startswith((".", "/", "~")) or model.endswith(".gguf") or not _HUB_ID.match(model):
        return True
    # "models/Foo" where models/ exists locally, or the default directory itself, is a path.
    return "/" in model and (Path(model).parent.is_dir() or Path(model) == Path(DEFAULT_MODEL_DIR))


def _missing_path_message(model: str) -> str:
    if Path(model) == Path(DEFAULT_MODEL_DIR):
        return f"model directory {model!r} does not exist; run `lorax-lite fetch-model` to create it"
    return (f"model path {model!r} does not exist; check the path "
            "(or run `lorax-lite fetch-model` for the default model)")


def _load_local(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if path.is_file():
        if path.suffix != ".gguf":
            raise FileNotFoundError(f"{str(path)!r} is a file but not a .gguf file; "
                                    "give a model directory or a .gguf file")
        return load_gguf(path, dtype)
    if (path / "config.json").is_file():
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return hf_model, AutoTokenizer.from_pretrained(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], dtype)
    raise FileNotFoundError(f"{str(path)!r} holds no config.json (and not exactly one .gguf file); "
                            "is it a model directory?")


def _load_from_hub(model: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        return hf_model, AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"could not load {model!r}: it is not a local path, and loading it as a hub id failed ({first_line}). "
            "Give a local model directory or .gguf file, or run `lorax-lite fetch-model` for the default model."
        ) from error


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a `.gguf` file dequantized to `dtype`, as a plain model (on CPU) and its tokenizer."""
    quantization_config = GgufConfig(dequantize=True)  # never keep packed GGUF blocks
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, quantization_config=quantization_config
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return as_plain_model(loaded, dtype), tokenizer


def as_plain_model(loaded: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A copy of `loaded` with no quantization config or quantizer: it saves and casts like any model."""
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    return plain
