"""Per-item failures that a stage records and steps over, later written to the atlas ``errors`` table."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator


@dataclass(frozen=True)
class ErrorRecord:
    """One failure: the stage that hit it, the shard and sample key (``""`` for a whole shard), why."""

    stage: str
    shard: str
    key: str
    reason: str


@dataclass
class ErrorLog:
    """An append-only collection of ``ErrorRecord``s, in the order they happened."""

    records: list[ErrorRecord] = field(default_factory=list)

    def append(self, record: ErrorRecord) -> None:
        """Add one record."""
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ErrorRecord]:
        return iter(self.records)

    def to_rows(self) -> list[dict[str, str]]:
        """The records as rows ``{"stage", "shard", "key", "reason"}`` of the ``errors`` table."""
        return [asdict(r) for r in self.records]
