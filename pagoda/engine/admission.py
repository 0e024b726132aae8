"""Admission control for `max_waiting`: decide, before a response starts, whether a request may queue.

The engine thread reports how many scheduler requests wait after each step, but a burst of HTTP requests
arrives between two reports, and a streaming response would already have sent its 200 by the time its add
command reaches the engine. So the event loop keeps its own account of the queue, in scheduler requests
(one per sample: n samples of p prompts count n * p):

    load = waiting (engine's last report) + unapplied (add commands sent, not yet applied) + reserved (admitted,
           not yet sent)

`admit()` reserves room for a whole HTTP request at once or refuses it; the `Ticket` then moves its share from
reserved to unapplied as each add command is sent, and `release()` gives back what was never sent (the client
left, a job failed early). Event-loop only, except `report()`, which the engine thread schedules onto it.
"""

from __future__ import annotations


class EngineOverloadedError(RuntimeError):
    """Too many requests are already waiting (`max_waiting`); the client should retry later."""


class Admission:
    def __init__(self, max_waiting: int | None):
        self.max_waiting = max_waiting
        self.waiting = 0
        self.unapplied = 0
        self.reserved = 0

    @property
    def load(self) -> int:
        return self.waiting + self.unapplied + self.reserved

    def admit(self, num_requests: int) -> Ticket:
        """Reserve room for `num_requests` scheduler requests, or raise EngineOverloadedError. A request larger
        than `max_waiting` is admitted when nothing waits, so a big n is slow rather than impossible."""
        load = self.load
        if self.max_waiting is not None and load > 0 and load + num_requests > self.max_waiting:
            raise EngineOverloadedError(f"{load} requests are already waiting (the limit is {self.max_waiting}); "
                                        "retry later")
        self.reserved += num_requests
        return Ticket(self, num_requests)

    def report(self, num_waiting: int, num_applied: int) -> None:
        """The engine thread's view after a step: `num_waiting` queued, `num_applied` adds consumed since the
        previous report."""
        self.waiting = num_waiting
        self.unapplied -= num_applied


class Ticket:
    """One HTTP request's reservation."""

    def __init__(self, admission: Admission, num_requests: int):
        self._admission = admission
        self.unsent = num_requests

    def send(self, num_requests: int) -> None:
        """An add command for `num_requests` of the reserved requests is being queued."""
        num = min(num_requests, self.unsent)
        self.unsent -= num
        self._admission.reserved -= num
        self._admission.unapplied += num_requests

    def release(self) -> None:
        """Give back whatever was never sent. Idempotent."""
        self._admission.reserved -= self.unsent
        self.unsent = 0
