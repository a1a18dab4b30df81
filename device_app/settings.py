"""The user's (or the fleet's) switches of one device, persisted in settings.json, and how saved
settings combine with the ones given at start-up."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_app import transport as transport_policy
from device_app.eligibility import EligibilitySettings
from device_app.jsonfile import read_json
from device_app.personalize import PersonalizationSettings
from device_app.store import DEFAULT_MAX_CHARS


@dataclass
class ClientSettings:
    """What the user (or the fleet) can change; persisted in settings.json."""

    server_url: str | None = None
    eligibility: EligibilitySettings = field(default_factory=EligibilitySettings)
    personalization: PersonalizationSettings = field(default_factory=PersonalizationSettings)
    auto_personalize: bool = True
    use_personal: bool = True
    max_chars: int = DEFAULT_MAX_CHARS
    sync_interval_s: float = 300.0
    upload_dtype: str = "float32"  # preferred; the task's list decides
    # How the https server is verified (device_app/transport.py); they belong to server_url.
    ca_file: str | None = None  # PEM CA file: chain + hostname verification
    pin_sha256: str | None = None  # SHA-256 of the server's DER certificate (lowercase hex)
    # The server's registration key (issue #18); None: $FK_REGISTRATION_KEY. Belongs to server_url too.
    registration_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "server_url": self.server_url,
            "ca_file": self.ca_file,
            "pin_sha256": self.pin_sha256,
            "registration_key": self.registration_key,
            "eligibility": self.eligibility.to_dict(),
            "personalization": self.personalization.to_dict(),
            "auto_personalize": self.auto_personalize,
            "use_personal": self.use_personal,
            "max_chars": self.max_chars,
            "sync_interval_s": self.sync_interval_s,
            "upload_dtype": self.upload_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClientSettings":
        known = {f.name for f in dataclasses.fields(PersonalizationSettings)}
        return cls(
            server_url=data.get("server_url"),
            ca_file=data.get("ca_file") or None,
            pin_sha256=data.get("pin_sha256") or None,
            registration_key=data.get("registration_key") or None,
            eligibility=EligibilitySettings.from_dict(data.get("eligibility", {})),
            personalization=PersonalizationSettings(**{k: v for k, v in data.get("personalization", {}).items() if k in known}),
            auto_personalize=bool(data.get("auto_personalize", True)),
            use_personal=bool(data.get("use_personal", True)),
            max_chars=int(data.get("max_chars", DEFAULT_MAX_CHARS)),
            sync_interval_s=float(data.get("sync_interval_s", 300.0)),
            upload_dtype=str(data.get("upload_dtype", "float32")),
        )


def resolve_settings(path: Path, settings: ClientSettings | None, server_url: str | None,
                     ca_file: str | os.PathLike | None, pin_sha256: str | None,
                     registration_key: str | None = None) -> ClientSettings:
    """The settings to run with: `settings`, else the saved ones (settings.json), else defaults; then the
    overrides (server_url, ca_file, pin_sha256, registration_key; "" clears the CA file, the pin or the
    key). A server_url other than the saved one drops the saved CA file, pin and registration key, which
    belong to that server only. Raises transport.TransportPolicyError for a URL or TLS setting the device
    refuses."""
    loaded = settings is None
    if settings is None:
        saved = read_json(path, None)
        settings = ClientSettings.from_dict(saved) if isinstance(saved, dict) else ClientSettings()
    if server_url is not None:
        if loaded and server_url != settings.server_url:
            settings.ca_file = settings.pin_sha256 = settings.registration_key = None
        settings.server_url = server_url
    if registration_key is not None:
        settings.registration_key = registration_key or None
    if ca_file is not None:
        settings.ca_file = str(ca_file) or None
    if pin_sha256 is not None:
        settings.pin_sha256 = pin_sha256 or None
    # Refuse before anything is stored or sent; keep the normalised forms (absolute path, hex).
    settings.ca_file, settings.pin_sha256 = transport_policy.check_settings(
        settings.server_url, settings.ca_file, settings.pin_sha256)
    return settings
