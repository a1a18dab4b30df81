"""Shared steps of the tff_sim tests."""
from __future__ import annotations

from typing import Any

import pytest


class _Stop(Exception):
    pass


def interrupt_and_resume(cfg: Any, data: Any, stop_after: int = 2) -> Any:
    """Run `cfg`, stopped after round `stop_after` as by Ctrl-C (the run checkpoints and stops), then rerun
    it: the resumed run's result (checked to have resumed from that round)."""
    from tff_sim.runner import run

    def stop(row: dict[str, Any]) -> None:
        if row["round"] == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        run(cfg, data, on_round=stop)
    resumed = run(cfg, data)
    assert resumed.summary["resumed_from"] == stop_after
    return resumed
