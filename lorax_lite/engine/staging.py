"""One host-to-device copy per step: a step's integer inputs packed into one pinned host buffer.

A step's inputs (token ids, positions, the attention backend's metadata, the sampled rows) are a dozen small
integer tensors. Copied one by one from pageable memory, each is a blocking transfer on a GPU. `StepUploader`
packs them into one pinned int64 buffer (grown when a step needs more, reused otherwise), copies that once
without blocking, and hands back device views of the same shapes. On the CPU there is nothing to copy: the host
tensors are the device tensors.

Reusing the pinned buffer is safe because every step ends with a device-to-host copy of its sampled tokens, which
waits for the stream, so the previous upload has finished before the buffer is written again.
"""

from __future__ import annotations

import torch


class StepUploader:
    """Uploads a step's int64 host tensors to `device` in one non-blocking copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_host = device.type == "cpu"
        self._pinned = torch.empty(0, dtype=torch.int64)

    def upload(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same tensors (any integer dtype, any shape) on the device, as int64, under the same names."""
        if self.on_host:
            return {name: t.to(torch.int64) for name, t in tensors.items()}
        total = sum(t.numel() for t in tensors.values())
        buffer = self._host_buffer(total)
        offset = 0
        for t in tensors.values():
            buffer[offset : offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        on_device = buffer[:total].to(self.device, non_blocking=True)
        out, offset = {}, 0
        for name, t in tensors.items():
            out[name] = on_device[offset : offset + t.numel()].view(t.shape)
            offset += t.numel()
        return out

    def _host_buffer(self, numel: int) -> torch.Tensor:
        if self._pinned.numel() < numel:
            size = max(numel, 2 * self._pinned.numel(), 4096)
            self._pinned = torch.empty(size, dtype=torch.int64, pin_memory=torch.cuda.is_available())
        return self._pinned
