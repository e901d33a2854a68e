"""Triton kernels of the GPU path: paged attention that reads the KV cache in place, and multi-LoRA shrink/expand.

Triton is optional. It ships with CUDA builds of torch; on a CPU machine `pip install triton` gives its
interpreter, which runs the same kernels on the CPU when TRITON_INTERPRET=1 is set before triton is imported.
That is how the tests check every kernel against its torch reference without a GPU; it is far too slow to serve
with. `check_triton(device)` says whether the kernels can run for a device, and why not.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether the triton package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read by triton at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unusable_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run for tensors on `device`; else why not, as a sentence."""
    if not triton_available():
        return "the triton package is not installed (it comes with CUDA builds of torch; or pip install triton)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # bf16 tensor-core dots, and what Triton's recent releases support
            return f"the kernels need a GPU of compute capability 8.0 or newer, this one is {major}.{minor}"
        return None
    if interpreting():
        return None
    return (f"Triton kernels need a CUDA device, not {device.type} (set TRITON_INTERPRET=1 to run them in "
            "Triton's CPU interpreter, for testing only)")


def check_triton(device: torch.device, what: str) -> None:
    """Raise ValueError, naming `what` asked for Triton, unless its kernels can run on `device`."""
    reason = triton_unusable_reason(device)
    if reason is not None:
        raise ValueError(f"{what} needs Triton: {reason}")


__all__ = ["check_triton", "interpreting", "triton_available", "triton_unusable_reason"]
