"""What one participation attempt of a device did (returned to the UI, the fleet and the tests)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """What one participation attempt did."""

    status: str  # ineligible | no_server | offline | no_task | no_model | no_data | uploaded | reported |
    #              pending | dropped | cancelled | secagg_unsupported | secagg_failed | rejected | error
    detail: str = ""
    round_id: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        rid = f" round {self.round_id}" if self.round_id is not None else ""
        return f"{self.status}{rid}{': ' + self.detail if self.detail else ''}"
