"""Reading PEFT LoRA adapters: real adapters saved by PEFT load with PEFT's scaling; every bad adapter is refused."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lora_helpers import AdapterSpec, make_peft_adapter, rewrite_config
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from lorax_lite.lora import weights
from lorax_lite.lora.synthetic import make_random_adapter, make_random_adapters
from lorax_lite.lora.weights import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfigError,
    AdapterError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTooLargeError,
    CorruptWeightsError,
    LoRAWeights,
    PickledWeightsError,
    TargetModuleError,
    UnsupportedAdapterError,
    load_lora_weights,
    read_adapter_config,
)

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
SUPPORTED = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def targets(llama: PreTrainedModel) -> dict[str, tuple[int, int]]:
    return _linear_targets(llama)


def _linear_targets(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
    """Every nn.Linear in the decoder layers -> (in_features, out_features), keyed by its module name."""
    return {f"model.layers.{name}": (module.in_features, module.out_features)
            for name, module in model.model.layers.named_modules() if isinstance(module, nn.Linear)}


@pytest.fixture
def adapter(llama: PreTrainedModel, tmp_path: Path) -> Path:
    return make_peft_adapter(llama, tmp_path / "adapter", AdapterSpec(rank=8, alpha=16))


def _load(path: Path, targets: dict, max_lora_rank: int = 16, **kwargs: object) -> LoRAWeights:
    return load_lora_weights(path, targets, max_lora_rank=max_lora_rank, **kwargs)


def _saved(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / ADAPTER_WEIGHTS_NAME)


def _edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = _saved(path)
    change(tensors)
    save_file(tensors, path / ADAPTER_WEIGHTS_NAME)


def _save_peft(model: PreTrainedModel, out: Path, **config: object) -> Path:
    """An adapter saved by PEFT straight from a LoraConfig (for features make_peft_adapter cannot express)."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **config))
    peft_model.save_pretrained(out)
    peft_model.unload()
    return out


# --- valid adapters --------------------------------------------------------------------------------


def test_valid_adapter_loads_with_peft_scaling(adapter: Path, targets: dict) -> None:
    lora = _load(adapter, targets)
    saved = _saved(adapter)
    assert sorted(lora.modules) == sorted(targets)
    assert (lora.rank, lora.alpha, lora.use_rslora) == (8, 16.0, False)
    assert lora.target_modules == SUPPORTED.split(", ")
    for name, (lora_a, lora_b) in lora.modules.items():
        in_features, out_features = targets[name]
        assert lora_a.shape == (8, in_features) and lora_b.shape == (out_features, 8)
        assert lora_a.is_contiguous() and lora_b.T.is_contiguous()  # B is stored transposed, as slots hold it
        assert lora_a.dtype == lora_b.dtype == torch.float32 and lora_a.device.type == "cpu"
        torch.testing.assert_close(lora_a, saved[f"{PREFIX}{name}.lora_A.weight"])
        torch.testing.assert_close(lora_b, saved[f"{PREFIX}{name}.lora_B.weight"] * 16 / 8)
    assert lora.size_bytes == sum(t.numel() * 4 for t in saved.values())
    assert read_adapter_config(adapter)["r"] == 8


def test_make_random_adapters_equals_one_at_a_time(llama: PreTrainedModel, tmp_path: Path) -> None:
    one = [make_random_adapter(llama, tmp_path / f"one-{seed}", rank=4, seed=seed) for seed in (3, 7)]
    many = make_random_adapters(llama, [tmp_path / "many-3", tmp_path / "many-7"], [3, 7], rank=4)
    for a, b in zip(one, many):
        assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()
        saved_a, saved_b = _saved(a), _saved(b)
        assert saved_a.keys() == saved_b.keys() and all(torch.equal(saved_a[k], saved_b[k]) for k in saved_a)
    first_a = _saved(many[0])[f"{PREFIX}{Q0}.lora_A.weight"]  # the first factor drawn: N(0, std^2 / fan_in), std 0.5
    fan_in = first_a.shape[1]
    torch.testing.assert_close(first_a, torch.randn(4, fan_in, generator=torch.Generator().manual_seed(3)) * 0.5 / fan_in ** 0.5)
    assert not torch.equal(first_a, _saved(many[1])[f"{PREFIX}{Q0}.lora_A.weight"])
    assert type(llama.model.layers[0].self_attn.q_proj) is nn.Linear  # PEFT unloaded: the model is left as it was
    with pytest.raises(ValueError, match="2 output directories for 1 seeds"):
        make_random_adapters(llama, [tmp_path / "x", tmp_path / "y"], [1])


def test_rslora_scales_by_alpha_over_sqrt_rank(llama: PreTrainedModel, targets: dict, tmp_path: Path) -> None:
    path = make_peft_adapter(llama, tmp_path / "rs", AdapterSpec(rank=4, alpha=8, use_rslora=True, target_modules=("q_proj",)))
    lora = _load(path, targets)
    assert lora.use_rslora and lora.target_modules == ["q_proj"]
    saved_b = _saved(path)[f"{PREFIX}{Q0}.lora_B.weight"]
    torch.testing.assert_close(lora.modules[Q0][1], saved_b * 8 / math.sqrt(4))


def test_rank_and_alpha_patterns_apply_per_module(llama: PreTrainedModel, targets: dict, tmp_path: Path) -> None:
    patterns = {"rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 16}, "alpha_pattern": {"v_proj": 4}}
    path = make_peft_adapter(llama, tmp_path / "pat", AdapterSpec(rank=8, alpha=16, extra=patterns))
    lora, saved = _load(path, targets), _saved(path)
    expected = {Q0: (4, 16 / 4), "model.layers.1.mlp.down_proj": (16, 16 / 16), "model.layers.0.mlp.down_proj": (8, 16 / 8),
                "model.layers.0.self_attn.v_proj": (8, 4 / 8), "model.layers.1.self_attn.k_proj": (8, 16 / 8)}
    for name, (rank, scaling) in expected.items():
        lora_a, lora_b = lora.modules[name]
        assert lora_a.shape[0] == rank
        torch.testing.assert_close(lora_b, saved[f"{PREFIX}{name}.lora_B.weight"] * scaling)
    assert lora.rank == 16


@pytest.mark.parametrize("spec", [
    AdapterSpec(rank=8, alpha=16),
    AdapterSpec(rank=4, alpha=8, use_rslora=True),
    AdapterSpec(rank=8, alpha=16, extra={"rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 16}, "alpha_pattern": {"v_proj": 4}}),
], ids=["plain", "rslora", "patterns"])
def test_delta_weights_match_peft(llama: PreTrainedModel, targets: dict, tmp_path: Path, spec: AdapterSpec) -> None:
    path = make_peft_adapter(llama, tmp_path / "adapter", spec)
    lora = _load(path, targets)
    peft_model = PeftModel.from_pretrained(llama, path)
    try:
        for name, (lora_a, lora_b) in lora.modules.items():
            expected = peft_model.base_model.model.get_submodule(name).get_delta_weight("default")
            torch.testing.assert_close(lora_b @ lora_a, expected)
    finally:
        peft_model.unload()


def test_dtype_argument_sets_the_tensor_dtype(adapter: Path, targets: dict) -> None:
    lora = _load(adapter, targets, dtype=torch.bfloat16)
    lora_a, lora_b = lora.modules[Q0]
    assert lora_a.dtype == lora_b.dtype == torch.bfloat16
    expected = (_saved(adapter)[f"{PREFIX}{Q0}.lora_B.weight"] * 2).to(torch.bfloat16)
    assert torch.equal(lora_b, expected)
    assert lora.size_bytes == _load(adapter, targets).size_bytes // 2


def test_adapter_name_segment_and_regex_targets_are_accepted(adapter: Path, targets: dict) -> None:
    def add_adapter_name(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)

    _edit_tensors(adapter, add_adapter_name)
    rewrite_config(adapter, target_modules=r".*\.(q|k|v|o|gate|up|down)_proj")
    assert len(_load(adapter, targets).modules) == len(targets)
    rewrite_config(adapter, target_modules="all-linear")
    assert len(_load(adapter, targets).modules) == len(targets)


def test_dotted_suffix_targets_are_accepted(llama: PreTrainedModel, targets: dict, tmp_path: Path) -> None:
    path = make_peft_adapter(llama, tmp_path / "suffix", AdapterSpec(target_modules=("self_attn.q_proj", "mlp.up_proj")))
    assert _load(path, targets).target_modules == ["q_proj", "up_proj"]


def test_pin_memory(adapter: Path, targets: dict) -> None:
    lora = _load(adapter, targets)
    pinned = lora.pin_memory()
    if not torch.cuda.is_available():
        assert pinned is lora
        return
    assert all(a.is_pinned() and b.is_pinned() for a, b in pinned.modules.values())
    assert all(torch.equal(pinned.modules[n][1], lora.modules[n][1]) for n in lora.modules)


def test_every_refusal_is_a_value_error() -> None:
    for error in (AdapterNotFoundError, AdapterConfigError, UnsupportedAdapterError, PickledWeightsError, AdapterRankError,
                  TargetModuleError, AdapterShapeError, CorruptWeightsError, AdapterTooLargeError):
        assert issubclass(error, AdapterError) and issubclass(error, ValueError)


# --- directory and config ----------------------------------------------------------------------------


def test_missing_directory_or_a_file_is_not_found(adapter: Path, targets: dict, tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match="no such directory"):
        _load(tmp_path / "nope", targets)
    with pytest.raises(AdapterNotFoundError, match="no such directory"):
        _load(adapter / ADAPTER_CONFIG_NAME, targets)


def test_missing_config(adapter: Path, targets: dict) -> None:
    (adapter / ADAPTER_CONFIG_NAME).unlink()
    with pytest.raises(AdapterConfigError, match="adapter_config.json is missing"):
        _load(adapter, targets)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not readable JSON"),
    (b"\xff\xfe{}", "not readable JSON"),
    ("[1, 2]", "holds a list, not a JSON object"),
    ('"LORA"', "holds a str"),
])
def test_malformed_config(adapter: Path, targets: dict, text: str | bytes, message: str) -> None:
    file = adapter / ADAPTER_CONFIG_NAME
    file.write_bytes(text) if isinstance(text, bytes) else file.write_text(text)
    with pytest.raises(AdapterConfigError, match=message):
        _load(adapter, targets)


def test_oversized_config(adapter: Path, targets: dict) -> None:
    (adapter / ADAPTER_CONFIG_NAME).write_text(" " * (weights.MAX_CONFIG_BYTES + 1) + "{}")
    with pytest.raises(AdapterTooLargeError, match="adapter_config.json is over"):
        _load(adapter, targets)


@pytest.mark.parametrize(("changes", "message"), [
    ({"peft_type": "IA3"}, "peft_type 'IA3'; lorax-lite serves only 'LORA'"),
    ({"peft_type": None}, "peft_type None"),
    ({"r": 0}, "r=0; r must be a positive integer"),
    ({"r": "8"}, "r='8'"),
    ({"r": True}, "r=True"),
    ({"r": 8.0}, "r=8.0"),
    ({"lora_alpha": -1}, "lora_alpha=-1; it must be a positive number"),
    ({"lora_alpha": False}, "lora_alpha=False"),
    ({"lora_alpha": None}, "lora_alpha=None"),
    ({"use_rslora": "yes"}, "use_rslora='yes'"),
    ({"target_modules": None}, "target_modules=None"),
    ({"target_modules": 5}, "target_modules=5"),
    ({"target_modules": ["q_proj", 1]}, "target_modules="),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern="),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern="),
    ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern="),
    ({"rank_pattern": {"q_proj(": 4}}, "not valid regexes"),
])
def test_bad_config_fields(adapter: Path, targets: dict, changes: dict, message: str) -> None:
    rewrite_config(adapter, **changes)
    with pytest.raises(AdapterConfigError, match=message.replace("(", r"\(")):
        _load(adapter, targets)


# --- unsupported PEFT features -------------------------------------------------------------------------


def test_dora_is_refused_by_config_and_by_its_tensors(llama: PreTrainedModel, targets: dict, tmp_path: Path) -> None:
    path = make_peft_adapter(llama, tmp_path / "dora", AdapterSpec(extra={"use_dora": True}))
    with pytest.raises(UnsupportedAdapterError, match=r"uses DoRA \(use_dora=true\), which lorax-lite cannot serve") as info:
        _load(path, targets)
    assert info.value.feature == "use_dora"
    rewrite_config(path, use_dora=False)  # the magnitude vectors still give it away
    with pytest.raises(UnsupportedAdapterError, match="lora_magnitude_vector") as info:
        _load(path, targets)
    assert info.value.feature == "use_dora"


def test_trained_biases_are_refused(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    qwen2 = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    path = _save_peft(qwen2, tmp_path / "bias", target_modules=["q_proj"], bias="all")
    assert any(key.endswith("k_proj.bias") for key in _saved(path))
    with pytest.raises(UnsupportedAdapterError, match="trained biases \\(bias='all'\\)") as info:
        _load(path, _linear_targets(qwen2))
    assert info.value.feature == "bias"


def test_lora_bias_is_refused_by_config_and_by_its_tensors(llama: PreTrainedModel, targets: dict, tmp_path: Path) -> None:
    path = _save_peft(llama, tmp_path / "lora-bias", target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(UnsupportedAdapterError, match="trained LoRA biases") as info:
        _load(path, targets)
    assert info.value.feature == "lora_bias"
    rewrite_config(path, lora_bias=False)
    with pytest.raises(UnsupportedAdapterError, match="lora_B.bias") as info:
        _load(path, targets)
    assert info.value.feature == "lora_bias"


def test_modules_to_save_is_refused(llama: PreTrainedModel, targets: dict, tmp_path: Path) -> None:
    path = make_peft_adapter(llama, tmp_path / "mts", AdapterSpec(extra={"modules_to_save": ["lm_head"]}))
    with pytest.raises(UnsupportedAdapterError, match="fully trained extra modules") as info:
        _load(path, targets)
    assert info.value.feature == "modules_to_save"
    rewrite_config(path, modules_to_save=None)  # the saved lm_head.weight is not a LoRA tensor
    with pytest.raises(AdapterShapeError, match="lm_head.weight is not a LoRA weight"):
        _load(path, targets)


@pytest.mark.parametrize(("key", "value"), [
    ("fan_in_fan_out", True), ("target_parameters", ["mlp.experts.gate_up_proj"]), ("layer_replication", [[0, 2]]),
    ("trainable_token_indices", [1, 2]), ("use_qalora", True), ("use_bdlora", {"nblocks": 2}),
    ("alora_invocation_tokens", [5]), ("arrow_config", {"top_k": 2}), ("velora_config", {"num_groups": 2}),
    ("init_lora_weights", "pissa"), ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "loftq"),
])
def test_unsupported_config_features(adapter: Path, targets: dict, key: str, value: object) -> None:
    rewrite_config(adapter, **{key: value})
    with pytest.raises(UnsupportedAdapterError, match="lorax-lite cannot serve; retrain without it") as info:
        _load(adapter, targets)
    assert info.value.feature == key


def test_harmless_config_values_are_accepted(adapter: Path, targets: dict) -> None:
    rewrite_config(adapter, init_lora_weights="gaussian", modules_to_save=[], bias="none", layers_to_transform=None)
    assert _load(adapter, targets).rank == 8


# --- target modules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_unsupported_target_modules(llama: PreTrainedModel, targets: dict, tmp_path: Path, module: str) -> None:
    path = make_peft_adapter(llama, tmp_path / module, AdapterSpec(target_modules=("q_proj", module)))
    with pytest.raises(TargetModuleError, match=f"targets '{module}', which lorax-lite does not support.*{SUPPORTED}"):
        _load(path, targets)


def test_unsupported_module_tensors_behind_a_regex_target(llama: PreTrainedModel, targets: dict, tmp_path: Path) -> None:
    lm_head = make_peft_adapter(llama, tmp_path / "head", AdapterSpec(target_modules=("q_proj", "lm_head")))
    rewrite_config(lm_head, target_modules=".*(q_proj|lm_head)")
    with pytest.raises(TargetModuleError, match=f"weights for lm_head, which lorax-lite does not support.*{SUPPORTED}"):
        _load(lm_head, targets)
    embed = make_peft_adapter(llama, tmp_path / "embed", AdapterSpec(target_modules=("q_proj", "embed_tokens")))
    rewrite_config(embed, target_modules="all-linear")
    with pytest.raises(UnsupportedAdapterError, match="LoRA on embeddings") as info:
        _load(embed, targets)
    assert info.value.feature == "lora_embedding"


def test_target_module_missing_from_the_model(adapter: Path, targets: dict) -> None:
    rewrite_config(adapter, target_modules=["q_proj", "c_attn"])
    with pytest.raises(TargetModuleError, match=f"'c_attn'.*supported modules: {SUPPORTED}"):
        _load(adapter, targets)


# --- ranks -----------------------------------------------------------------------------------------


def test_rank_above_max_lora_rank(adapter: Path, targets: dict) -> None:
    with pytest.raises(AdapterRankError, match="rank 8 is above max_lora_rank 4; raise max_lora_rank to at least 8"):
        _load(adapter, targets, max_lora_rank=4)


def test_rank_pattern_above_max_lora_rank(llama: PreTrainedModel, targets: dict, tmp_path: Path) -> None:
    path = make_peft_adapter(llama, tmp_path / "pat", AdapterSpec(rank=4, extra={"rank_pattern": {"v_proj": 32}}))
    with pytest.raises(AdapterRankError, match="rank 32 is above max_lora_rank 16"):
        _load(path, targets, max_lora_rank=16)


def test_tensor_rank_above_max_lora_rank_when_the_config_understates_it(adapter: Path, targets: dict) -> None:
    rewrite_config(adapter, r=4)
    with pytest.raises(AdapterRankError, match="rank 8 is above max_lora_rank 4"):
        _load(adapter, targets, max_lora_rank=4)


def test_tensor_rank_that_disagrees_with_the_config(adapter: Path, targets: dict) -> None:
    rewrite_config(adapter, r=4)
    with pytest.raises(AdapterShapeError, match=r"lora_A \(8, .*expected \(4, "):
        _load(adapter, targets)


# --- weights file ------------------------------------------------------------------------------------


def test_pickled_weights_are_refused_unopened(adapter: Path, targets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(_saved(adapter), adapter / "adapter_model.bin")
    (adapter / ADAPTER_WEIGHTS_NAME).unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on an adapter"))
    with pytest.raises(PickledWeightsError, match="adapter_model.bin.*convert to safetensors"):
        _load(adapter, targets)


def test_missing_weights(adapter: Path, targets: dict) -> None:
    (adapter / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(CorruptWeightsError, match="adapter_model.safetensors is missing"):
        _load(adapter, targets)


def test_truncated_weights(adapter: Path, targets: dict) -> None:
    file = adapter / ADAPTER_WEIGHTS_NAME
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError, match="is corrupt"):
        _load(adapter, targets)


@pytest.mark.parametrize("data", [b"", b"\xff" * 8 + b"garbage", (16).to_bytes(8, "little") + b'{"a": [1, 2, 3]}'],
                         ids=["empty", "huge-header-size", "bad-header-json"])
def test_garbage_weights_header(adapter: Path, targets: dict, data: bytes) -> None:
    (adapter / ADAPTER_WEIGHTS_NAME).write_bytes(data)
    with pytest.raises(CorruptWeightsError, match="is corrupt.*re-save"):
        _load(adapter, targets)


def test_weights_over_max_bytes_are_refused_before_reading(adapter: Path, targets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    size = (adapter / ADAPTER_WEIGHTS_NAME).stat().st_size
    monkeypatch.setattr(weights, "load_safetensors", lambda *a, **k: pytest.fail("the oversized file was read"))
    with pytest.raises(AdapterTooLargeError, match=f"is {size} bytes, over the {size - 1}-byte limit"):
        _load(adapter, targets, max_bytes=size - 1)


def test_adapter_for_a_differently_sized_model(tiny_llama_dir: Path, targets: dict, tmp_path: Path) -> None:
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    narrow = AutoModelForCausalLM.from_config(config)
    path = make_peft_adapter(narrow, tmp_path / "narrow", AdapterSpec(target_modules=("q_proj",)))
    with pytest.raises(AdapterShapeError, match=r"q_proj has lora_A \(8, 32\).*expected \(8, 64\).*different model"):
        _load(path, targets)


def test_missing_lora_b(adapter: Path, targets: dict) -> None:
    _edit_tensors(adapter, lambda t: t.pop(f"{PREFIX}{Q0}.lora_B.weight"))
    with pytest.raises(AdapterShapeError, match=f"{Q0} has no lora_B tensor"):
        _load(adapter, targets)


def test_tensor_for_an_unknown_module(adapter: Path, targets: dict) -> None:
    unknown = f"{PREFIX}model.layers.7.self_attn.q_proj.lora_A.weight"
    _edit_tensors(adapter, lambda t: t.update({unknown: torch.zeros(8, 64)}))
    with pytest.raises(AdapterShapeError, match="model.layers.7.self_attn.q_proj, which is not in the base model"):
        _load(adapter, targets)


def test_tensor_that_is_not_a_lora_weight(adapter: Path, targets: dict) -> None:
    _edit_tensors(adapter, lambda t: t.update({f"{PREFIX}{Q0}.scale": torch.ones(1)}))
    with pytest.raises(AdapterShapeError, match=r"q_proj.scale is not a LoRA weight"):
        _load(adapter, targets)


def test_integer_tensors(adapter: Path, targets: dict) -> None:
    _edit_tensors(adapter, lambda t: t.update({f"{PREFIX}{Q0}.lora_A.weight": torch.ones(8, 64, dtype=torch.int32)}))
    with pytest.raises(AdapterShapeError, match="torch.int32.*must be floating point"):
        _load(adapter, targets)


def test_duplicate_tensor_for_one_side(adapter: Path, targets: dict) -> None:
    _edit_tensors(adapter, lambda t: t.update({f"{PREFIX}{Q0}.lora_A.default.weight": torch.zeros(8, 64)}))
    with pytest.raises(AdapterShapeError, match="two lora_A tensors"):
        _load(adapter, targets)


def test_no_lora_tensors(adapter: Path, targets: dict) -> None:
    save_file({}, adapter / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(AdapterShapeError, match="holds no LoRA tensors"):
        _load(adapter, targets)

