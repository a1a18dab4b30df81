"""The secure-aggregation hook of the device client.

When a training task carries secure-aggregation parameters (the server asks that updates be
masked so it only ever sees their sum), the client hands its privatized delta to a
SecureAggregation implementation before encoding it. The protocol itself belongs to the
privacy issue; this module defines the interface and the registry the client consults.

A client with no implementation that accepts the task's parameters declines the round
(outcome "secagg_unsupported") rather than upload an unmasked delta the server did not ask for.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class SecureAggregation(Protocol):
    """Masks one device's update for a secure-aggregation round."""

    name: str

    def supports(self, params: dict[str, Any]) -> bool:
        """Whether this implementation can run the protocol the server described."""
        ...

    def protect(
        self, api: Any, task: Any, tensors: Sequence[np.ndarray]
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Run the protocol's device side (key exchange with the server through `api`, masking)
        and return (the tensors to upload, extra metadata for the upload)."""
        ...


def choose(hooks: Sequence[SecureAggregation], params: dict[str, Any] | None) -> SecureAggregation | None:
    """The first hook that supports `params` (None when params is empty or nothing fits)."""
    if not params:
        return None
    for hook in hooks:
        if hook.supports(params):
            return hook
    return None


__all__ = ["SecureAggregation", "choose"]
