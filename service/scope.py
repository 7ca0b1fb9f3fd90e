"""Per-request facts gathered while a call runs (request id, resolved model, its work items), shared between the
telemetry interceptor and the servicer through a context variable."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from batching import WorkItem


@dataclass
class RequestScope:
    request_id: str
    rpc: str
    model: str = ""  # the served tag once the request's model is resolved; never the client's raw string
    items: list[WorkItem] = field(default_factory=list)

    def queue_ms(self) -> float:
        return max((i.trace.queue_wait for i in self.items), default=0.0) * 1e3

    def run_ms(self) -> float:
        """Wall time from the first item's run starting to the last one's ending (not the sum of items)."""
        runs = [i.trace for i in self.items if i.trace.finished]
        if not runs:
            return 0.0
        return (max(t.finished for t in runs) - min(t.started for t in runs)) * 1e3

    def batch_size(self) -> int:
        return max((i.trace.batch_size for i in self.items), default=0)


current: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("request_scope", default=None)


def get() -> RequestScope | None:
    return current.get()
