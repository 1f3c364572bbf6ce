"""Which items one of several processes takes (jobs/processes.py gives each process its `Share`;
the tasks that walk a fixed order of items ask it of every place)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Share:
    """Process `index` of `count` takes the items whose place in the job's order is index modulo count:
    a split that depends only on that order, never on timing or on what is already done."""

    index: int = 0
    count: int = 1

    def owns(self, place: int) -> bool:
        return place % self.count == self.index
