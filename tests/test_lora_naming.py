"""Adapter ids: what a user may name an adapter (checked before any filesystem or registry access)."""

import pytest

from lorax_lite.lora.naming import InvalidAdapterIdError, check_adapter_id

@pytest.mark.parametrize("adapter_id", ["a", "A9", "my-adapter_v1.2", "0" * 64, "x" + "." * 63])
def test_check_adapter_id_accepts_well_formed_ids(adapter_id):
    assert check_adapter_id(adapter_id) == adapter_id


@pytest.mark.parametrize("adapter_id", ["", "a" * 65, "../x", "a/b", ".hidden", "-x", "_x", "a b", "a\tb", "é", None, 7, b"ab"])
def test_check_adapter_id_refuses_malformed_ids(adapter_id):
    with pytest.raises(InvalidAdapterIdError, match="invalid adapter id") as excinfo:
        check_adapter_id(adapter_id)
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize("adapter_id", ["a\n", "a" * 64 + "\n"])
def test_check_adapter_id_refuses_a_trailing_newline(adapter_id):
    with pytest.raises(InvalidAdapterIdError):
        check_adapter_id(adapter_id)
