"""The headless device client: local text, suggestions, personalization and federated rounds.

    client = DeviceClient("~/.fk-device", server_url="http://127.0.0.1:8080")
    client.suggest("see you tom")            # -> ["tomorrow", "tonight", "tom"]
    client.apply_suggestion("see you tom", "tomorrow")   # -> "see you tomorrow "
    client.commit("see you tomorrow!")       # the message is stored on the device only
    client.sync()                            # download a newer global model (ETag)
    client.participate_once()                # check in; if given a task: train, clip, noise, upload
    client.personalize_if_due()              # fine-tune the personal model, measure the gain
    client.forget_data()                     # delete the typed text and everything learned from it

Data dir layout: text.db (the user's messages, SQLite), model/global, model/personal (bundles),
settings.json (the user's switches), state.json (registration, ETag, counters), pending/ (an
upload waiting for the network), sent.jsonl (a log of everything uploaded: sizes, hashes, norms,
never content).

What leaves the device: check-ins (three eligibility booleans and a model version), model
downloads, wire-format deltas (trained - global, clipped to the round's L2 bound, Gaussian noise
of the round's stddev added, optionally masked by secure aggregation) carrying an example count
and training-loss numbers, and evaluation reports (recall/loss numbers). Never text, token ids,
the personal typing cache (its n-gram counts) or the personal model.

Transport security (device_app/transport.py): plain http:// only to this machine; an https server
is verified with the system CAs, a CA file (`ca_file`) or a pinned certificate fingerprint
(`pin_sha256`), both saved in settings.json with the server URL (another URL drops them).

Offline: with no server, or when it is unreachable, suggestions keep working (global or
bundled initial model, personal model); a finished update waits in pending/ until its round's
deadline, then it is dropped with the round.

Structure: this class orchestrates; each collaborator has one job. settings.py (the switches),
device_state.py (state.json), sent_log.py, pending.py, connection.py (the ServerAPI, registration),
model_sync.py (global model downloads), client_update.py (train -> delta -> clip/noise, no HTTP),
uploads.py (wire upload, or a secure-aggregation hook around it), training_task.py and evaluation.py
(a round's task end to end), reports.py (telemetry, privacy report), personalize.py, eligibility.py,
store.py, model_state.py.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from device_app import secagg as secagg_mod
from device_app import transport as transport_policy
from device_app.connection import ServerConnection
from device_app.device_state import DeviceState
from device_app.eligibility import BatteryProbe, Eligibility, EligibilityMonitor, psutil_battery_charging
from device_app.evaluation import run_eval_task
from device_app.http_client import CheckIn, Offline, ServerAPI, ServerError
from device_app.jsonfile import write_json_atomic
from device_app.model_state import ModelState
from device_app.model_sync import ModelCache, ModelSync
from device_app.outcome import Outcome
from device_app.pending import PendingUploads
from device_app.personalize import Personalizer
from device_app.progress import Progress, ProgressReporter
from device_app.reports import Reports
from device_app.sent_log import SentLog
from device_app.keyholder_pin import device_hooks
from device_app.private_files import private_dir
from device_app.settings import ClientSettings, resolve_settings
from device_app.store import TextStore
from device_app.training_task import run_train_task
from device_app.uploads import UploadContext, flush_pending
from models.suggest import apply_suggestion as _apply_suggestion


class DeviceClient:
    """One device. Thread-safe for one UI thread plus one background worker."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        server_url: str | None = None,
        *,
        settings: ClientSettings | None = None,
        initial_bundle: str | os.PathLike | None | bool = None,
        api: ServerAPI | None = None,
        transport: Any = None,
        on_request: Callable[[Any], None] | None = None,
        http_client: Any = None,
        battery_probe: BatteryProbe = psutil_battery_charging,
        secure_aggregation: Sequence[secagg_mod.SecureAggregation] | None = None,
        seed: int | None = None,
        model_cache: ModelCache | None = None,
        persist_models: bool = True,
        save_settings: bool = True,
        ca_file: str | os.PathLike | None = None,
        pin_sha256: str | None = None,
        registration_key: str | None = None,
    ) -> None:
        """server_url / ca_file / pin_sha256 override the saved settings ("" clears ca_file or the pin);
        a server_url other than the saved one drops the saved CA file and pin, which vouch for that
        server only. Raises transport.TransportPolicyError for a URL or TLS setting the device refuses
        (plain http:// to another machine, a malformed pin). An injected `transport` or `http_client`
        verifies TLS by itself (build it with tls_transport.make_transport). `registration_key`: the server's
        registration key (saved in settings.json, 0600; default $FK_REGISTRATION_KEY)."""
        self.data_dir = private_dir(Path(data_dir).expanduser())  # 0700: token, typed text (issue #18)
        self._settings_path = self.data_dir / "settings.json"
        self.pending_dir = self.data_dir / "pending"
        self.sent_log_path = self.data_dir / "sent.jsonl"
        self._save_settings = save_settings
        self.settings = resolve_settings(self._settings_path, settings, server_url, ca_file, pin_sha256,
                                         registration_key)
        self._lock = threading.RLock()
        self._net_lock = threading.Lock()
        self._state = DeviceState(self.data_dir / "state.json", self.settings.server_url, self._lock)
        self.store = TextStore(self.data_dir / "text.db", max_chars=self.settings.max_chars)
        # the typing cache is built from the stored messages when suggestions first need it
        self.models = ModelState(self.data_dir / "model", initial_bundle=initial_bundle, messages=self.store.messages)
        self.models.personal_enabled = self.settings.use_personal
        self.eligibility = EligibilityMonitor(self.settings.eligibility, battery_probe=battery_probe)
        self.personalizer = Personalizer(self.settings.personalization)
        # None: SecAgg (identity key and peer pins in the data dir) and Paillier; () declines every protected round.
        self.secure_aggregation = list(device_hooks(self.data_dir) if secure_aggregation is None
                                       else secure_aggregation)
        self.rng = np.random.default_rng(seed)
        self.model_cache = model_cache
        self.persist_models = persist_models
        self._progress = ProgressReporter()
        self.link = ServerConnection(self.settings, self._state, self._lock, api=api, transport=transport,
                                     on_request=on_request, http_client=http_client)
        self.sent = SentLog(self.sent_log_path, self._lock)
        self.pending = PendingUploads(self.pending_dir)
        self.uploads = UploadContext(self.link, self.sent, self.pending, self._state, self._progress)
        self.model_sync = ModelSync(self.link, self.models, self._state, self._progress, model_cache, persist_models)
        self._cancel = threading.Event()
        for hook in self.secure_aggregation:  # a closing app leaves a SecAgg round at its next stage
            if hook.should_stop is None:
                hook.should_stop = self._cancel.is_set
        self.last_outcome: Outcome | None = None
        self.current_task: Any = None  # the http_client.Task being worked on (the fleet's progress lines read it)
        self.reports = Reports(self.link, self._state, self.sent, self._net_lock)
        self.session_facts, self.telemetry = self.reports.session_facts, self.reports.telemetry
        self.save_settings()

    # ================================================================== views of the collaborators

    @property
    def state(self) -> dict[str, Any]:
        """state.json's data (registration, ETag, counters, schedule times)."""
        return self._state.data

    @property
    def api(self) -> ServerAPI | None:
        return self.link.api

    @property
    def connection(self) -> str:
        return self.link.status

    @property
    def last_error(self) -> str | None:
        return self.link.last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self.link.last_error = value

    @property
    def progress(self) -> tuple[float, str] | None:
        return self._progress.current

    def ensure_registered(self) -> ServerAPI:
        return self.link.ensure_registered()

    def server_version(self) -> int | None:
        """The version of our global model if it came from this server (not the bundled initial one)."""
        return self.model_sync.server_version()

    # ================================================================== settings

    def save_settings(self) -> None:
        if self._save_settings:
            write_json_atomic(self._settings_path, self.settings.to_dict())

    def set_server_url(self, url: str | None, *, ca_file: str | None = None, pin_sha256: str | None = None,
                       registration_key: str | None = None) -> None:
        """Talk to another server (None: offline). Another URL drops the old server's CA file / pin /
        registration key (pass the new server's); the same URL with ca_file / pin_sha256 changes only how it
        is verified. Raises transport.TransportPolicyError, changing nothing, for a URL or setting the device
        refuses."""
        with self._lock:
            url = (url or "").strip() or None
            if url == self.settings.server_url and ca_file is None and pin_sha256 is None:
                if registration_key is not None and registration_key != self.settings.registration_key:
                    self.settings.registration_key = registration_key or None
                    self.link.reset()
                    self.save_settings()
                return  # the same server (e.g. the app's field submitted again): keep its verification
            ca, pin = transport_policy.check_settings(url, ca_file, pin_sha256)
            if registration_key is not None or url != self.settings.server_url:
                self.settings.registration_key = registration_key or None
            if url == self.settings.server_url:
                self.settings.ca_file, self.settings.pin_sha256 = ca, pin
                self.link.reset()
                self.save_settings()
                return
            self.settings.server_url, self.settings.ca_file, self.settings.pin_sha256 = url, ca, pin
            self._state.reset(url)
            self.link.reset()
            self.link.status = "no server" if not url else "unknown"
            self.save_settings()
            self._state.save()

    def set_participation(self, **switches: Any) -> None:
        """participate / charging / unmetered / idle / idle_after_s / use_battery_sensor."""
        known = {f.name for f in dataclasses.fields(self.settings.eligibility)}
        for key, value in switches.items():
            if key not in known:
                raise KeyError(key)
            setattr(self.settings.eligibility, key, value)
        self.save_settings()

    def set_use_personal(self, enabled: bool) -> None:
        self.settings.use_personal = bool(enabled)
        self.models.personal_enabled = bool(enabled)
        self.save_settings()

    # ================================================================== typing

    def note_keystroke(self) -> None:
        self.eligibility.note_activity()

    def suggest(self, text: str, k: int = 3) -> list[str]:
        words = self.models.suggest(text, k)
        if words and self.models.serving == "personal":
            self.session_facts.note("personal_model_used")
        return words

    def apply_suggestion(self, text: str, suggestion: str) -> str:
        """Insert a tapped suggestion, replacing the partial word being typed (models.suggest)."""
        self.session_facts.note("suggestion_accepted")
        return _apply_suggestion(text, suggestion)

    def commit(self, text: str, *, typed_now: bool = True) -> bool:
        """The user sent/finished a message: keep it in the local store (only there).
        typed_now=False for text imported or replayed, which does not make the device busy."""
        if typed_now:
            self.eligibility.note_activity()
        stored = self.store.add(text)
        if stored:
            self.models.note_message(text)  # the personal typing cache (memory only, never uploaded)
        return stored

    # ================================================================== progress and cancel

    def add_progress_listener(self, fn: Progress) -> None:
        self._progress.add_listener(fn)

    def cancel(self) -> None:
        """Ask running training to stop (the app is closing)."""
        self._cancel.set()

    # ================================================================== sync

    def sync(self) -> bool:
        """Download the current global model if it changed (conditional GET). True if installed."""
        if self.api is None:
            return False
        with self._net_lock:
            try:
                return self.model_sync.sync()
            except Offline as exc:
                self.link.offline(exc)
                return False
            finally:
                self._progress.done()

    # ================================================================== participation

    def participate_once(
        self,
        *,
        force: bool = False,
        should_drop: Callable[[], bool] | None = None,
        eligibility: Eligibility | None = None,
    ) -> Outcome:
        """One check-in, and the task if one is given.

        force: the user pressed "train now": the idle condition is waived (charging,
        unmetered and the participation switch still apply). should_drop: polled during
        training; True abandons the task (fleet dropouts). eligibility: override (fleet)."""
        outcome = self._participate(force=force, should_drop=should_drop, eligibility=eligibility)
        self.last_outcome = outcome
        with self._lock:
            self.state["last_outcome"] = {"status": outcome.status, "detail": outcome.detail,
                                          "round_id": outcome.round_id, "at": time.time()}
            self._state.save()
        return outcome

    def _participate(self, *, force: bool, should_drop: Callable[[], bool] | None, eligibility: Eligibility | None) -> Outcome:
        if self.api is None:
            return Outcome("no_server", "no server configured")
        elig = eligibility or self.eligibility.current()
        if force:
            elig = dataclasses.replace(elig, idle=True)
        if not elig.eligible:
            return Outcome("ineligible", ", ".join(elig.reasons()))
        with self._net_lock:
            try:
                flush_pending(self.uploads)
                self._progress.report(0.02, "checking in")
                checkin: CheckIn = self.link.call(lambda api: api.check_in(elig.conditions(), self.server_version()))
                with self._lock:
                    self.state["last_checkin"] = time.time()
                    if checkin.retry_after is not None:
                        self.state["next_checkin_at"] = time.time() + checkin.retry_after
                if checkin.task is None:
                    if checkin.global_version is not None and checkin.global_version != self.server_version():
                        self.model_sync.sync()
                    return Outcome("no_task", checkin.reason or "", info={"retry_after": checkin.retry_after})
                self.state.pop("next_checkin_at", None)
                task = self.current_task = checkin.task
                if task.type == "evaluate":
                    return run_eval_task(task, should_drop, ctx=self.uploads, sync=self.model_sync,
                                         models=self.models, store=self.store)
                if task.type == "train":
                    return run_train_task(task, should_drop=should_drop, should_stop=self._stopper(should_drop, force),
                                          ctx=self.uploads, sync=self.model_sync, models=self.models, store=self.store,
                                          hooks=self.secure_aggregation, upload_dtype=self.settings.upload_dtype,
                                          rng=self.rng)
                return Outcome("error", f"unknown task type {task.type!r}", task.round_id)
            except Offline as exc:
                self.link.offline(exc)
                return Outcome("offline", str(exc))
            except ServerError as exc:
                self.link.online()
                self.last_error = str(exc)
                return Outcome("rejected", f"{exc.reason}: {exc.detail}")
            finally:
                self.current_task = None
                self._progress.done()

    def _stopper(self, should_drop: Callable[[], bool] | None, force: bool) -> Callable[[], bool]:
        def stop() -> bool:
            if self._cancel.is_set():
                return True
            if should_drop is not None and should_drop():
                return True
            if not force:
                current = self.eligibility.current()
                return not current.eligible
            return False

        return stop

    # ================================================================== pending uploads

    def pending_uploads(self) -> list[int]:
        return self.pending.rounds()

    def flush_pending(self) -> None:
        if self.api is None:
            return
        with self._net_lock:
            try:
                flush_pending(self.uploads)
            except Offline as exc:
                self.link.offline(exc)

    # ================================================================== privacy report and telemetry

    def refresh_privacy(self) -> dict[str, Any] | None:
        """The population epsilon the server reports (None offline)."""
        return None if self.api is None else self.reports.refresh_privacy()

    def report_telemetry(self) -> dict[str, Any] | None:
        """Randomized-response answers about this session (device_app/reports.py); None offline or refused."""
        return None if self.api is None else self.reports.report_telemetry()

    # ================================================================== personalization and forgetting

    def personalize_if_due(self) -> dict[str, Any] | None:
        if not self.settings.auto_personalize or not self.personalizer.due(self.store, self.models):
            return None
        return self.personalize()

    def personalize(self) -> dict[str, Any] | None:
        """Build the personal model now (None if there is not enough text yet)."""
        try:
            gain = self.personalizer.run(
                self.store, self.models, progress=self._progress.report, should_stop=self._cancel.is_set,
                seed=int(self.rng.integers(2**31)),
            )
        except ValueError as exc:
            self.last_error = str(exc)
            return None
        finally:
            self._progress.done()
        with self._lock:
            self.state["personal_gain"] = gain
            self._state.save()
        return gain

    def forget_data(self) -> None:
        """Delete the typed text, the personal model, the typing cache and any pending update derived from them."""
        with self._lock:
            self.store.forget()
            self.models.drop_personal()
            self.pending.clear()
            self.state.pop("personal_gain", None)
            self._state.save()
        self.sent.append({"type": "forget", "status": "local"})

    # ================================================================== log and status

    def sent_log(self) -> list[dict[str, Any]]:
        return self.sent.entries()

    def status(self) -> dict[str, Any]:
        elig = self.eligibility.current()
        privacy = self.state.get("privacy") or {}
        return {
            "server_url": self.settings.server_url,
            "ca_file": self.settings.ca_file,
            "pin_sha256": self.settings.pin_sha256,
            "connection": self.connection,
            "device_id": self.state.get("device_id"),
            "last_error": self.last_error,
            "model": self.models.status(),
            "global_version": self.models.global_version,
            "personal_gain": self.state.get("personal_gain"),
            "last_round": self.state.get("last_round"),
            "contributions": int(self.state.get("contributions", 0)),
            "evaluations": int(self.state.get("evaluations", 0)),
            "population_epsilon": privacy.get("epsilon"),
            "privacy": privacy or None,
            "eligibility": {**elig.conditions(), "participate": elig.participate, "eligible": elig.eligible},
            "settings": self.settings.eligibility.to_dict(),
            "use_personal": self.settings.use_personal,
            "messages": self.store.count(),
            "pending_uploads": self.pending_uploads(),
            "progress": self.progress,
            "last_outcome": self.state.get("last_outcome"),
        }

    # ================================================================== lifecycle

    def due_for_checkin(self) -> bool:
        return time.time() >= float(self.state.get("next_checkin_at", 0.0))

    def due_for_sync(self) -> bool:
        return time.time() - float(self.state.get("last_sync", 0.0)) >= self.settings.sync_interval_s

    def tick(self) -> list[str]:
        """One round of background chores: sync, pending uploads, check-in, personalization."""
        done = []
        if self.api is not None:
            if self.due_for_sync() or self.server_version() is None:
                if self.sync():
                    done.append("synced")
            if self.pending_uploads():
                self.flush_pending()
            if self.due_for_checkin() and self.eligibility.current().eligible:
                done.append(str(self.participate_once()))
            if self.reports.telemetry_due():
                if self.report_telemetry() is not None:
                    done.append("telemetry")
        if self.personalize_if_due() is not None:
            done.append("personalized")
        return done

    def close(self) -> None:
        self.cancel()
        self.link.reset()
        self.store.close()

    def __enter__(self) -> "DeviceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ClientSettings", "DeviceClient", "ModelCache", "Outcome"]
