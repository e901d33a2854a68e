"""Read a PEFT LoRA adapter directory into validated per-module tensors, ready to copy into slots.

Nothing in the directory is executed or unpickled: the config is JSON, the weights are read with
safetensors. Every refusal is an `AdapterError` whose message says what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from lorax_lite.lora.errors import (
    AdapterConfigError,
    AdapterError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTooLargeError,
    CorruptWeightsError,
    PickledWeightsError,
    TargetModuleError,
    UnsupportedAdapterError,
)
from lorax_lite.lora.naming import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

DEFAULT_MAX_ADAPTER_BYTES = 1 << 30
MAX_CONFIG_BYTES = 1 << 20

# config key -> what it is; any truthy value is refused (the adapter needs more than A and B)
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA", "lora_bias": "trained LoRA biases", "modules_to_save": "fully trained extra modules",
    "fan_in_fan_out": "transposed Conv1D weights", "target_parameters": "LoRA on raw parameters",
    "layer_replication": "layer replication", "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA", "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
# unconverted PiSSA/OLoRA/CorDA/LoftQ adapters are deltas to a modified base model, not to ours
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_UNSUPPORTED_TENSORS = {  # tensor name pattern -> (feature, what it is)
    r"\.lora_magnitude_vector\b": ("use_dora", "DoRA"),
    r"\.lora_embedding_[AB]\b": ("lora_embedding", "LoRA on embeddings"),
    r"\.lora_[AB](\.[\w-]+)?\.bias$": ("lora_bias", "trained LoRA biases"),
}
_PEFT_PREFIX = "base_model.model."
_ANY_UNSUPPORTED_TENSOR = re.compile("|".join(f"(?:{p})" for p in _UNSUPPORTED_TENSORS))
_LORA_TENSOR = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(\.[\w-]+)?\.weight")  # optional adapter-name segment
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

Targets = Mapping[str, tuple[int, int]]


@dataclass
class LoRAWeights:
    """One adapter, ready to copy into slots.

    `modules` maps a base-model module name to (lora_a [r, in], lora_b [out, r]) on CPU, with the
    scaling folded into lora_b. lora_a is contiguous; lora_b is stored transposed (`lora_b.T` is
    contiguous), as the slots hold it. `rank` is the largest rank over the modules.
    """

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.modules.values() for t in pair)

    def pin_memory(self) -> LoRAWeights:
        """The same weights in pinned host memory (self when CUDA is not available)."""
        if not torch.cuda.is_available():
            return self
        return replace(self, modules={name: (a.pin_memory(), b.pin_memory()) for name, (a, b) in self.modules.items()})


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and validate `path`/adapter_config.json; rank_pattern and alpha_pattern come back as dicts."""
    if not Path(path).is_dir():
        raise AdapterNotFoundError(
            f"adapter at {path}: no such directory; "
            f"pass the directory holding {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}")
    config = _parse_config(path, Path(path) / ADAPTER_CONFIG_NAME)
    _check_config_types(path, config)
    _check_features(path, config)
    return config


def load_lora_weights(
    path: str | os.PathLike,
    targets: Targets,
    max_lora_rank: int,
    dtype: torch.dtype = torch.float32,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> LoRAWeights:
    """Read the adapter at `path` for a base model whose LoRA-capable modules are `targets`.

    `targets` maps a module name to its (in_features, out_features). Raises an AdapterError
    subclass when the adapter cannot be served exactly as PEFT would run it.
    """
    config = read_adapter_config(path)
    supported = sorted({name.rsplit(".", 1)[-1] for name in targets})
    _check_target_modules(path, config["target_modules"], targets, supported)
    for rank in [config["r"], *config["rank_pattern"].values()]:
        _check_rank(path, rank, max_lora_rank)
    pairs = _group_pairs(path, _read_tensors(path, max_bytes), targets, supported)
    modules = {name: _prepare_module(path, config, name, pairs[name], targets[name], max_lora_rank, dtype)
               for name in sorted(pairs)}
    return LoRAWeights(
        rank=max(a.shape[0] for a, _ in modules.values()),
        alpha=float(config["lora_alpha"]),
        use_rslora=config.get("use_rslora", False),
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in modules}),
        modules=modules,
    )


def _parse_config(path: str | os.PathLike, file: Path) -> dict:
    name = ADAPTER_CONFIG_NAME
    if not file.is_file():
        raise AdapterConfigError(f"adapter at {path}: {name} is missing; save the adapter with PEFT's save_pretrained")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterTooLargeError(f"adapter at {path}: {name} is over {MAX_CONFIG_BYTES} bytes; "
                                   "it is not a PEFT config")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterConfigError(f"adapter at {path}: {name} is not readable JSON ({error}); "
                                 "re-save the adapter") from error
    if not isinstance(config, dict):
        raise AdapterConfigError(f"adapter at {path}: {name} holds a {type(config).__name__}, not a JSON object")
    return config


def _check_config_types(path: str | os.PathLike, config: dict) -> None:
    def require(ok: bool, problem: str) -> None:
        if not ok:
            raise AdapterConfigError(f"adapter at {path}: {ADAPTER_CONFIG_NAME} has {problem}")

    get = config.get
    require(get("peft_type") == "LORA", f"peft_type {get('peft_type')!r}; lorax-lite serves only 'LORA' adapters")
    require(_is_positive(get("r"), int), f"r={get('r')!r}; r must be a positive integer")
    require(_is_positive(get("lora_alpha"), (int, float)),
            f"lora_alpha={get('lora_alpha')!r}; it must be a positive number")
    require(isinstance(get("use_rslora", False), bool), f"use_rslora={get('use_rslora')!r}; it must be true or false")
    targets = get("target_modules")
    require(isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets)),
            f"target_modules={targets!r}; it must be a list of module names or a regex string")
    for key, types in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = config[key] = get(key) or {}
        require(isinstance(pattern, dict) and all(_is_positive(v, types) for v in pattern.values()),
                f"{key}={pattern!r}; it must map module patterns to positive numbers")
        require(all(_is_regex(k) for k in pattern), f"{key} keys that are not valid regexes: {list(pattern)!r}")


def _check_features(path: str | os.PathLike, config: dict) -> None:
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            _refuse_feature(path, key, f"{feature} ({key}={json.dumps(config[key])})")
    if config.get("bias", "none") != "none":
        _refuse_feature(path, "bias", f"trained biases (bias={config['bias']!r})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        _refuse_feature(path, "init_lora_weights",
                        f"an unconverted {init} initialisation, a delta to a modified base model")


def _refuse_feature(path: str | os.PathLike, feature: str, what: str) -> None:
    raise UnsupportedAdapterError(f"adapter at {path}: uses {what}, which lorax-lite cannot serve; "
                                  "retrain without it or merge it into the base model", feature)


def _check_target_modules(path: str | os.PathLike, target_modules: str | list[str], targets: Targets,
                          supported: list[str]) -> None:
    if isinstance(target_modules, str):
        return  # "all-linear" or a regex: the tensors show what it actually targets
    for entry in target_modules:
        if entry not in supported and not any(name == entry or name.endswith("." + entry) for name in targets):
            raise TargetModuleError(f"adapter at {path}: targets {entry!r}, "
                                    "which lorax-lite does not support in this model; "
                                    f"supported modules: {', '.join(supported)}")


def _check_rank(path: str | os.PathLike, rank: int, max_lora_rank: int) -> None:
    if rank > max_lora_rank:
        raise AdapterRankError(
            f"adapter at {path}: rank {rank} is above max_lora_rank {max_lora_rank}; "
            f"raise max_lora_rank to at least {rank}")


def _read_tensors(path: str | os.PathLike, max_bytes: int) -> dict[str, torch.Tensor]:
    file = Path(path) / ADAPTER_WEIGHTS_NAME
    if not file.is_file():
        _refuse_missing_weights(path)
    if (size := file.stat().st_size) > max_bytes:
        raise AdapterTooLargeError(f"adapter at {path}: {ADAPTER_WEIGHTS_NAME} is {size} bytes, "
                                   f"over the {max_bytes}-byte limit; raise the limit or use a smaller adapter")
    try:
        return load_safetensors(file.read_bytes())  # one read; safetensors checks the header and offsets
    except (SafetensorError, OSError, TypeError, ValueError) as error:
        raise CorruptWeightsError(
            f"adapter at {path}: {ADAPTER_WEIGHTS_NAME} is corrupt ({error}); re-save or re-download it") from error


def _refuse_missing_weights(path: str | os.PathLike) -> None:
    if pickled := sorted(p.name for p in Path(path).iterdir() if p.suffix in _PICKLE_SUFFIXES):
        raise PickledWeightsError(f"adapter at {path}: has pickled weights ({', '.join(pickled)}) "
                                  f"and no {ADAPTER_WEIGHTS_NAME}; lorax-lite never unpickles: "
                                  "convert to safetensors (save_pretrained(safe_serialization=True))")
    raise CorruptWeightsError(f"adapter at {path}: {ADAPTER_WEIGHTS_NAME} is missing; "
                              "save the adapter with save_pretrained")


def _group_pairs(path: str | os.PathLike, tensors: dict[str, torch.Tensor], targets: Targets,
                 supported: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    _refuse_unsupported_tensors(path, tensors)
    matches = {key: _LORA_TENSOR.fullmatch(key.removeprefix(_PEFT_PREFIX)) for key in tensors}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, match in matches.items():
        if match is not None:  # other tensors are reported after these, whose errors say more
            _check_module(path, match["module"], targets, supported)
            if match["side"] in pairs.setdefault(match["module"], {}):
                raise AdapterShapeError(f"adapter at {path}: {match['module']} has two lora_{match['side']} tensors")
            pairs[match["module"]][match["side"]] = tensors[key]
    if others := [key for key, match in matches.items() if match is None]:
        raise AdapterShapeError(f"adapter at {path}: tensor {others[0]} is not a LoRA weight "
                                "(<module>.lora_A.weight or .lora_B.weight); "
                                "lorax-lite serves plain LoRA adapters only")
    _check_pairs_complete(path, pairs)
    return pairs


def _refuse_unsupported_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    for key in tensors:
        if _ANY_UNSUPPORTED_TENSOR.search(key):  # one scan per name; find which feature only on a hit
            for pattern, (feature, what) in _UNSUPPORTED_TENSORS.items():
                if re.search(pattern, key):
                    _refuse_feature(path, feature, f"{what} (tensor {key})")


def _check_module(path: str | os.PathLike, module: str, targets: Targets, supported: list[str]) -> None:
    if module in targets:
        return
    if module.rsplit(".", 1)[-1] not in supported:
        raise TargetModuleError(f"adapter at {path}: has LoRA weights for {module}, which lorax-lite does not support; "
                                f"supported modules: {', '.join(supported)}")
    raise AdapterShapeError(f"adapter at {path}: has LoRA weights for {module}, which is not in the base model; "
                            "was it trained for a different model?")


def _check_pairs_complete(path: str | os.PathLike, pairs: dict[str, dict[str, torch.Tensor]]) -> None:
    if not pairs:
        raise AdapterShapeError(f"adapter at {path}: {ADAPTER_WEIGHTS_NAME} holds no LoRA tensors")
    for module, sides in pairs.items():
        if missing := {"A", "B"} - sides.keys():
            raise AdapterShapeError(f"adapter at {path}: {module} has no lora_{missing.pop()} tensor; "
                                    "re-save the adapter")


def _prepare_module(path: str | os.PathLike, config: dict, module: str, pair: dict[str, torch.Tensor],
                    features: tuple[int, int], max_lora_rank: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lora_a, lora_b = pair["A"], pair["B"]  # [r, in], [out, r]
    if not (lora_a.is_floating_point() and lora_b.is_floating_point()):
        raise AdapterShapeError(
            f"adapter at {path}: {module} has {lora_a.dtype}/{lora_b.dtype} tensors; "
            "LoRA weights must be floating point")
    if lora_a.dim() == 2:
        _check_rank(path, lora_a.shape[0], max_lora_rank)
    rank, alpha = _module_rank_alpha(config, module)
    (in_features, out_features), shapes = features, (tuple(lora_a.shape), tuple(lora_b.shape))
    if shapes != ((rank, in_features), (out_features, rank)):
        raise AdapterShapeError(f"adapter at {path}: {module} has lora_A {shapes[0]} and lora_B {shapes[1]}, "
                                f"expected {(rank, in_features)} and {(out_features, rank)}; "
                                "was it trained for a different model?")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
    # B is laid out transposed in memory ([r, out] contiguous, seen as [out, r]): slots store B
    # transposed, so putting an adapter into a slot is a straight copy.
    lora_b_t = torch.empty(lora_b.shape[::-1], dtype=torch.float32)
    torch.mul(lora_b.T, scaling, out=lora_b_t)  # fold in fp32, transpose in the same pass
    return lora_a.to(dtype).contiguous(), lora_b_t.to(dtype).T


def _module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    # As PEFT: the first pattern key that full-matches a dotted suffix of the module name applies.
    def lookup(patterns: dict, default: Any) -> Any:
        return next((value for key, value in patterns.items() if re.match(rf"(.*\.)?({key})$", module)), default)

    return (int(lookup(config["rank_pattern"], config["r"])),
            float(lookup(config["alpha_pattern"], config["lora_alpha"])))


def _is_positive(value: object, types: type | tuple[type, ...]) -> bool:
    if not isinstance(value, types) or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value > 0


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


__all__ = [
    "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "DEFAULT_MAX_ADAPTER_BYTES", "AdapterConfigError", "AdapterError",
    "AdapterNotFoundError", "AdapterRankError", "AdapterShapeError", "AdapterTooLargeError", "CorruptWeightsError",
    "LoRAWeights", "PickledWeightsError", "TargetModuleError", "UnsupportedAdapterError", "load_lora_weights",
    "read_adapter_config",
]
