"""Invariant checks: internal bookkeeping that must hold whatever the input. A broken one is a bug.

They raise InvariantError (never `assert`, which `python -O` strips). The allocators'
`check_invariants()` run in tests and, with LORAX_DEBUG_INVARIANTS=1, whenever the engine goes idle.
"""

from __future__ import annotations

import os

DEBUG_ENV = "LORAX_DEBUG_INVARIANTS"


class InvariantError(AssertionError):
    """Internal bookkeeping is inconsistent (a bug in lorax-lite, not bad input)."""


def require(condition: bool, message: str) -> None:
    """Raise InvariantError(message) unless `condition` holds."""
    if not condition:
        raise InvariantError(message)


def debug_invariants() -> bool:
    """Whether to check invariants whenever the engine goes idle (LORAX_DEBUG_INVARIANTS=1)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
