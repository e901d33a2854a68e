"""One host-to-device copy per step: a step's integer inputs packed into one pinned host buffer.

A step's inputs (token ids, positions, the attention backend's metadata, the sampled rows) are a dozen small
integer tensors. Copied one by one from pageable memory, each is a blocking transfer on a GPU. `StepUploader`
packs them into one pinned int64 buffer, copies that once without blocking, and hands back device views of the
same shapes. On the CPU there is nothing to copy: the host tensors are the device tensors.

Each step packs into a fresh buffer from torch's caching host allocator, which hands a pinned block out again
only once the copies recorded on it have completed. Reusing one buffer would not be safe: a step that samples
nothing (a prompt chunk) ends without waiting for the device, so the next step could overwrite the buffer while
its copy is still queued behind the GPU's work.
"""

from __future__ import annotations

import torch


class StepUploader:
    """Uploads a step's integer host tensors to `device` in one non-blocking copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_host = device.type == "cpu"

    def upload(self, *groups: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The same tensors (any integer dtype, any shape) on the device, as int64, in the same groups and names:
        every group in the one copy."""
        if self.on_host:
            return [{name: t.to(torch.int64) for name, t in group.items()} for group in groups]
        tensors = [t for group in groups for t in group.values()]
        buffer = torch.empty(sum(t.numel() for t in tensors), dtype=torch.int64, pin_memory=True)
        torch.cat([t.reshape(-1).to(torch.int64) for t in tensors], out=buffer)
        on_device = buffer.to(self.device, non_blocking=True)
        out, offset = [], 0
        for group in groups:
            views = {}
            for name, t in group.items():
                views[name] = on_device[offset : offset + t.numel()].view(t.shape)
                offset += t.numel()
            out.append(views)
        return out
