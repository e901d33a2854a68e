"""Waiting for an AsyncLLM in tests, through its snapshot (what the server reads), never its internals."""

from __future__ import annotations

import time

from lorax_lite import AsyncLLM


def wait_until_idle(llm: AsyncLLM, timeout: float = 10.0) -> None:
    """Until no request waits or runs and no KV block is held; then the allocators' idle invariants hold."""
    deadline = time.monotonic() + timeout
    while True:
        snap = llm.snapshot()
        if snap.num_waiting == snap.num_running == snap.num_kv_blocks_used == 0:
            break
        assert time.monotonic() < deadline, f"engine did not go idle: {snap}"
        time.sleep(0.01)
