"""The fleet's progress lines: while it waits on a round, where that round stands, at a steady pace.

    round 7: open, 2 of 3 updates submitted (4 admitted, 3 devices working on it); global v2
    round 8: open, secagg stage share_keys (keys 4, shares 4, masked 0), 0 of 3 updates submitted (...)
    waiting for a round: no device was given a task yet; global v1

The round comes from the devices themselves (the task a device is working on, else the last
round one reported on); its counts from the device API's GET /v1/rounds/{id} (and, in a secure
aggregation round, GET /v1/rounds/{id}/secagg): counts only, as any device may read them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from device_app.http_client import Offline, ServerAPI, ServerError

Call = Callable[[Callable[[ServerAPI], Any]], Any]  # DeviceClient.link.call


@dataclass
class RoundSeen:
    round_id: int
    protocol: str | None  # "secagg", "paillier" or None (plain)
    working: int  # devices with this round's task in hand now


def format_round_progress(seen: RoundSeen | None, info: dict[str, Any] | None, secagg: dict[str, Any] | None,
                          global_version: int | None) -> str:
    """One progress line (pure: the tests check its wording)."""
    version = "global v?" if global_version is None else f"global v{global_version}"
    if seen is None:
        return f"waiting for a round: no device was given a task yet; {version}"
    if info is None:
        return f"round {seen.round_id}: no answer from the server yet ({seen.working} devices working on it); {version}"
    parts = [str(info.get("state", "?"))]
    if secagg:
        parts.append(f"{seen.protocol or 'secagg'} stage {secagg.get('stage', '?')} (keys {secagg.get('n_u1', 0)}, "
                     f"shares {secagg.get('n_u2', 0)}, masked {secagg.get('n_u3', 0)})")
    parts.append(f"{info.get('accepted', 0)} of {info.get('goal', '?')} updates submitted "
                 f"({info.get('admitted', 0)} admitted, {seen.working} devices working on it)")
    return f"round {seen.round_id} ({info.get('kind', 'train')}): " + ", ".join(parts) + f"; {version}"


def round_progress(call: Call, seen: RoundSeen | None, global_version: int | None) -> str:
    """Ask the server where `seen`'s round stands and format the line (network errors: said so in the line)."""
    if seen is None:
        return format_round_progress(None, None, None, global_version)
    try:
        info = call(lambda api: api.round_info(seen.round_id))
        secagg = None
        if seen.protocol == "secagg" and info.get("state") == "open":
            secagg = call(lambda api: api.get_json(f"/v1/rounds/{seen.round_id}/secagg"))
    except (Offline, ServerError):
        info, secagg = None, None
    return format_round_progress(seen, info, secagg, global_version)


__all__ = ["RoundSeen", "format_round_progress", "round_progress"]
