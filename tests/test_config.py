"""EngineConfig: frozen, checks its own values (dtype and device names in one place), documents each field."""

from __future__ import annotations

import dataclasses

import pytest

from lorax_lite.config import DEFAULT_MODEL_DIR, EngineConfig


def test_engine_config_is_frozen() -> None:
    config = EngineConfig(model="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_loras = 1  # type: ignore[misc]
    assert config.max_loras == 8


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_are_accepted(device: str) -> None:
    assert EngineConfig(model="m", device=device).device == device  # whether it exists is the loader's to say


@pytest.mark.parametrize("device", ["cuda:x", "cuda:", "cuda:-1", "gpu", "CPU", "", "cpu "])
def test_bad_device_is_refused(device: str) -> None:
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, cuda:N"):
        EngineConfig(model="m", device=device)


@pytest.mark.parametrize("dtype", ["fp16", "float64", "", "int8"])
def test_bad_dtype_is_refused(dtype: str) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig(model="m", dtype=dtype)


def test_default_model_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAX_MODEL", raising=False)
    assert EngineConfig().model == EngineConfig.from_kwargs().model == DEFAULT_MODEL_DIR
    monkeypatch.setenv("LORAX_MODEL", "other/model")
    assert EngineConfig().model == EngineConfig.from_kwargs(None).model == EngineConfig.from_kwargs("").model == "other/model"
    assert EngineConfig.from_kwargs("mine").model == "mine"
    with pytest.raises(ValueError, match="model must name"):
        EngineConfig(model="")


@pytest.mark.parametrize("field", dataclasses.fields(EngineConfig), ids=lambda f: f.name)
def test_every_field_has_help(field: dataclasses.Field) -> None:
    assert field.metadata["help"].strip()
