"""Process-wide state kept where ``importlib.reload`` cannot replace it."""

from __future__ import annotations

import sys
import types
import weakref
from typing import Any

# A module object that no file backs: reloading any poolkit module re-runs its code, but this entry of
# sys.modules is only ever created once per process, so the pools and metric objects in it survive.
_KEY = "poolkit._process_state"


class ProcessState:
    """Everything that must exist once per process: pool registry, live pools, metric objects."""

    def __init__(self) -> None:
        self.registry: dict[tuple[Any, ...], Any] = {}
        self.live_pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self.inherited: list[Any] = []  # a forked child's copies of the parent's pools, never touched
        self.metrics: Any = None
        self.collector_registered = False
        self.fork_hook_installed = False


def get_state() -> ProcessState:
    module = sys.modules.get(_KEY)
    if module is None:
        module = types.ModuleType(_KEY, "poolkit's process-wide state (not reloadable on purpose)")
        setattr(module, "state", ProcessState())  # noqa: B010 - a plain ModuleType has no typed attributes
        sys.modules[_KEY] = module
    state: ProcessState = getattr(module, "state")  # noqa: B009
    return state
