"""The acquire timeouts of an async pool's waiters on one event loop, served by one loop timer."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any


class Waiter:
    """A caller waiting for a connection, as :class:`Deadlines` sees it.

    The acquire context managers are their own waiter records (they subclass this): one object less to
    allocate on every acquisition that waits. ``task`` is None once the caller stopped waiting.
    """

    __slots__ = ("cancelling", "deadline", "expired", "task")

    task: asyncio.Task[Any] | None
    deadline: float
    cancelling: int
    expired: bool


class Deadlines:
    """The acquire timeouts of one binding's waiters, served by one loop timer.

    ``asyncio.timeout()`` per waiter schedules and cancels a timer handle on every acquisition that has to
    wait, which on a busy pool (every acquisition waits) was the largest part of the wrapper's cost. Here
    waiters queue in arrival order, served ones leave from the front, and a single timer is armed for the
    earliest deadline; when it fires, waiters past their deadline are cancelled (and turn that into
    PoolTimeout, the way ``asyncio.timeout`` turns it into TimeoutError). A finished waiter sets its
    ``task`` to None and calls :meth:`done`.
    """

    __slots__ = ("armed", "loop", "queue", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[Waiter] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.armed = math.inf

    def add(self, waiter: Waiter, timeout: float) -> asyncio.Task[Any] | None:
        """Queue ``waiter`` (the current task) with a deadline ``timeout`` seconds away; return the task."""
        loop = self.loop
        waiter.task = task = asyncio.current_task(loop)
        waiter.cancelling = task.cancelling() if task is not None else 0
        waiter.expired = False
        waiter.deadline = deadline = loop.time() + timeout
        self.queue.append(waiter)
        if deadline < self.armed:
            self.arm(deadline)
        return task

    def done(self) -> None:
        """Drop the finished waiters at the front of the queue."""
        queue = self.queue
        while queue and queue[0].task is None:
            queue.popleft()

    def arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._fire)
        self.armed = when

    def _fire(self) -> None:
        self.timer = None
        self.armed = math.inf
        now = self.loop.time()
        upcoming = math.inf
        for waiter in self.queue:
            task = waiter.task
            if task is None or waiter.expired:
                continue
            if waiter.deadline <= now:
                waiter.expired = True
                task.cancel()
            elif waiter.deadline < upcoming:
                upcoming = waiter.deadline
        if upcoming < math.inf:
            self.arm(upcoming)

    def cancel(self) -> None:
        """Disarm the timer (the binding is closing)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
