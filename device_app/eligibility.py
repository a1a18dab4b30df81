"""When may this device take part in a federated round: charging, on an unmetered network, idle.

Phones read these from the OS. On a desktop they are settings, except charging, which
follows psutil's battery state where the machine has a battery (a laptop on battery is not
charging whatever the setting says). Idle also requires that the user has not typed for
`idle_after_s` seconds. The user can switch participation off entirely.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

BatteryProbe = Callable[[], "bool | None"]


def psutil_battery_charging() -> bool | None:
    """True/False from the OS battery sensor, None when there is no battery (a desktop)."""
    try:
        import psutil

        battery = psutil.sensors_battery()
    except Exception:  # noqa: BLE001 - unsupported platforms raise assorted errors
        return None
    if battery is None:
        return None
    return bool(battery.power_plugged)


@dataclass
class EligibilitySettings:
    """User-facing switches. `charging`/`unmetered`/`idle` stand in for OS state on a desktop."""

    participate: bool = True
    charging: bool = True  # used when there is no battery sensor
    unmetered: bool = True
    idle: bool = True
    idle_after_s: float = 30.0  # typing within this long makes the device not idle
    use_battery_sensor: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EligibilitySettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Eligibility:
    charging: bool
    unmetered: bool
    idle: bool
    participate: bool = True

    @property
    def eligible(self) -> bool:
        return self.participate and self.charging and self.unmetered and self.idle

    def conditions(self) -> dict[str, bool]:
        """What a check-in reports to the server."""
        return {"charging": self.charging, "unmetered": self.unmetered, "idle": self.idle}

    def reasons(self) -> list[str]:
        """Why the device is not eligible (empty when it is)."""
        out = [] if self.participate else ["participation is off"]
        out += [f"not {name}" for name, ok in self.conditions().items() if not ok]
        return out


class EligibilityMonitor:
    """Combines settings, the battery sensor and the time of the last keystroke."""

    def __init__(
        self,
        settings: EligibilitySettings | None = None,
        battery_probe: BatteryProbe = psutil_battery_charging,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or EligibilitySettings()
        self.battery_probe = battery_probe
        self.clock = clock
        self._last_activity: float | None = None

    def note_activity(self) -> None:
        """Call on every keystroke: typing means the device is in use, not idle."""
        self._last_activity = self.clock()

    def battery(self) -> bool | None:
        return self.battery_probe() if self.settings.use_battery_sensor else None

    def current(self) -> Eligibility:
        s = self.settings
        sensed = self.battery()
        charging = s.charging if sensed is None else (sensed and s.charging)
        recently_active = self._last_activity is not None and self.clock() - self._last_activity < s.idle_after_s
        return Eligibility(charging=charging, unmetered=s.unmetered, idle=s.idle and not recently_active, participate=s.participate)


__all__ = ["Eligibility", "EligibilityMonitor", "EligibilitySettings", "psutil_battery_charging"]
