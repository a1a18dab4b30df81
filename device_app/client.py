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
or the personal model.

Transport security (device_app/transport.py): plain http:// only to this machine; an https server
is verified with the system CAs, a CA file (`ca_file`) or a pinned certificate fingerprint
(`pin_sha256`), both saved in settings.json with the server URL (another URL drops them).

Offline: with no server, or when it is unreachable, suggestions keep working (global or
bundled initial model, personal model); a finished update waits in pending/ until its round's
deadline, then it is dropped with the round.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from device_app import secagg as secagg_mod
from device_app import transport as transport_policy
from device_app.eligibility import BatteryProbe, Eligibility, EligibilityMonitor, EligibilitySettings, psutil_battery_charging
from device_app.http_client import (
    FINAL_UPLOAD_REASONS,
    CheckIn,
    Offline,
    ServerAPI,
    ServerError,
    Task,
    UntrustedServer,
)
from device_app.model_state import ModelState
from device_app.personalize import PersonalizationSettings, Personalizer
from device_app.store import DEFAULT_MAX_CHARS, TextStore
from device_app.telemetry import SessionFacts, TelemetryReporter
from models import wire
from models.config import ModelConfig
from models.suggest import apply_suggestion as _apply_suggestion
from models.vocab import Vocabulary

log = logging.getLogger("device_app.client")

Progress = Callable[[float, str], None]


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "server_url": self.server_url,
            "ca_file": self.ca_file,
            "pin_sha256": self.pin_sha256,
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
            eligibility=EligibilitySettings.from_dict(data.get("eligibility", {})),
            personalization=PersonalizationSettings(**{k: v for k, v in data.get("personalization", {}).items() if k in known}),
            auto_personalize=bool(data.get("auto_personalize", True)),
            use_personal=bool(data.get("use_personal", True)),
            max_chars=int(data.get("max_chars", DEFAULT_MAX_CHARS)),
            sync_interval_s=float(data.get("sync_interval_s", 300.0)),
            upload_dtype=str(data.get("upload_dtype", "float32")),
        )


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


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default


class ModelCache:
    """Decoded global models shared by devices of one process (fleet mode), keyed by ETag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, tuple[ModelConfig, Vocabulary, list[np.ndarray], int]] = {}
        self._vocab: dict[str, Vocabulary] = {}

    def get(self, etag: str | None) -> tuple[ModelConfig, Vocabulary, list[np.ndarray], int] | None:
        if not etag:
            return None
        with self._lock:
            return self._items.get(etag)

    def put(self, etag: str | None, value: tuple[ModelConfig, Vocabulary, list[np.ndarray], int]) -> None:
        if etag:
            with self._lock:
                self._items[etag] = value
                while len(self._items) > 4:
                    self._items.pop(next(iter(self._items)))

    def vocab(self, vocab_hash: str, fetch: Callable[[], Vocabulary]) -> Vocabulary:
        with self._lock:
            hit = self._vocab.get(vocab_hash)
        if hit is None:
            hit = fetch()
            with self._lock:
                self._vocab[vocab_hash] = hit
        return hit


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
    ) -> None:
        """server_url / ca_file / pin_sha256 override the saved settings ("" clears ca_file or the pin);
        a server_url other than the saved one drops the saved CA file and pin, which vouch for that
        server only. Raises transport.TransportPolicyError for a URL or TLS setting the device refuses
        (plain http:// to another machine, a malformed pin). An injected `transport` or `http_client`
        verifies TLS by itself (build it with transport.make_transport)."""
        self.data_dir = Path(data_dir).expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._settings_path = self.data_dir / "settings.json"
        self._state_path = self.data_dir / "state.json"
        self.pending_dir = self.data_dir / "pending"
        self.sent_log_path = self.data_dir / "sent.jsonl"
        self._save_settings = save_settings
        loaded = settings is None
        if settings is None:
            saved = _read_json(self._settings_path, None)
            settings = ClientSettings.from_dict(saved) if isinstance(saved, dict) else ClientSettings()
        if server_url is not None:
            if loaded and server_url != settings.server_url:
                settings.ca_file = settings.pin_sha256 = None
            settings.server_url = server_url
        if ca_file is not None:
            settings.ca_file = str(ca_file) or None
        if pin_sha256 is not None:
            settings.pin_sha256 = pin_sha256 or None
        # Refuse before anything is stored or sent; keep the normalised forms (absolute path, hex).
        settings.ca_file, settings.pin_sha256 = transport_policy.check_settings(
            settings.server_url, settings.ca_file, settings.pin_sha256)
        self.settings = settings
        self.state: dict[str, Any] = _read_json(self._state_path, {})
        if self.state.get("server_url") != settings.server_url:
            # Another server: its registration, ETag and counters do not apply.
            self.state = {"server_url": settings.server_url}
        self._lock = threading.RLock()
        self._net_lock = threading.Lock()
        self.store = TextStore(self.data_dir / "text.db", max_chars=settings.max_chars)
        self.models = ModelState(self.data_dir / "model", initial_bundle=initial_bundle)
        self.models.personal_enabled = settings.use_personal
        self.eligibility = EligibilityMonitor(settings.eligibility, battery_probe=battery_probe)
        self.personalizer = Personalizer(settings.personalization)
        # None: SecAgg (identity key and peer pins in the data dir) and Paillier; () declines every protected round.
        self.secure_aggregation = list(secagg_mod.default_hooks(self.data_dir) if secure_aggregation is None
                                       else secure_aggregation)
        self.rng = np.random.default_rng(seed)
        self.model_cache = model_cache
        self.persist_models = persist_models
        self._transport = transport
        self._on_request = on_request
        self._http_client = http_client  # an httpx.Client shared by fleet devices
        self._api = api
        self.connection = "no server" if not settings.server_url else "unknown"
        self.last_error: str | None = None
        self.progress: tuple[float, str] | None = None
        self._progress_listeners: list[Progress] = []
        self._cancel = threading.Event()
        for hook in self.secure_aggregation:  # a closing app leaves a SecAgg round at its next stage
            if hasattr(hook, "should_stop") and hook.should_stop is None:
                hook.should_stop = self._cancel.is_set
        self.last_outcome: Outcome | None = None
        self.session_facts = SessionFacts()  # yes/no facts of this session, reported by randomized response
        self.telemetry = TelemetryReporter()
        self.save_settings()

    # ================================================================== settings and state

    def save_settings(self) -> None:
        if self._save_settings:
            _write_json_atomic(self._settings_path, self.settings.to_dict())

    def _save_state(self) -> None:
        with self._lock:
            _write_json_atomic(self._state_path, self.state)

    def set_server_url(self, url: str | None, *, ca_file: str | None = None, pin_sha256: str | None = None) -> None:
        """Talk to another server (None: offline). Another URL drops the old server's CA file / pin
        (pass the new server's); the same URL with ca_file / pin_sha256 changes only how it is verified.
        Raises transport.TransportPolicyError, changing nothing, for a URL or setting the device refuses."""
        with self._lock:
            url = (url or "").strip() or None
            if url == self.settings.server_url and ca_file is None and pin_sha256 is None:
                return  # the same server (e.g. the app's field submitted again): keep its verification
            ca, pin = transport_policy.check_settings(url, ca_file, pin_sha256)
            if url == self.settings.server_url:
                self.settings.ca_file, self.settings.pin_sha256 = ca, pin
                if self._api is not None:
                    self._api.close()
                self._api = None
                self.save_settings()
                return
            self.settings.server_url, self.settings.ca_file, self.settings.pin_sha256 = url, ca, pin
            self.state = {"server_url": url}
            if self._api is not None:
                self._api.close()
            self._api = None
            self.connection = "no server" if not url else "unknown"
            self.save_settings()
            self._save_state()

    def set_participation(self, **switches: Any) -> None:
        """participate / charging / unmetered / idle / idle_after_s / use_battery_sensor."""
        for key, value in switches.items():
            if not hasattr(self.settings.eligibility, key):
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
        return self.store.add(text)

    # ================================================================== progress and cancel

    def add_progress_listener(self, fn: Progress) -> None:
        self._progress_listeners.append(fn)

    def _progress(self, fraction: float, message: str) -> None:
        self.progress = (max(0.0, min(1.0, fraction)), message)
        for fn in list(self._progress_listeners):
            try:
                fn(*self.progress)
            except Exception:  # noqa: BLE001 - a UI callback must not break training
                log.exception("progress listener failed")

    def _done(self) -> None:
        self.progress = None
        for fn in list(self._progress_listeners):
            try:
                fn(1.0, "")
            except Exception:  # noqa: BLE001
                log.exception("progress listener failed")

    def cancel(self) -> None:
        """Ask running training to stop (the app is closing)."""
        self._cancel.set()

    # ================================================================== server plumbing

    @property
    def api(self) -> ServerAPI | None:
        with self._lock:
            if self._api is None and self.settings.server_url:
                injected = self._transport is not None or self._http_client is not None
                self._api = ServerAPI(
                    self.settings.server_url,
                    token=self.state.get("token"),
                    device_id=self.state.get("device_id"),
                    transport=self._transport,
                    on_request=self._on_request,
                    client=self._http_client,
                    # an injected transport / shared client was built with its own verification
                    ca_file=None if injected else self.settings.ca_file,
                    pin_sha256=None if injected else self.settings.pin_sha256,
                )
            return self._api

    def _online(self) -> None:
        self.connection = "online"
        self.last_error = None

    def _offline(self, exc: Exception) -> None:
        if isinstance(exc, UntrustedServer):  # not a dead network: someone else answered
            self.connection = "untrusted server"
            log.warning("%s", exc)
        else:
            self.connection = "offline"
            log.info("server unreachable: %s", exc)
        self.last_error = str(exc)

    def ensure_registered(self) -> ServerAPI:
        api = self.api
        if api is None:
            raise Offline("no server configured")
        if not api.token:
            device_id, token = api.register()
            with self._lock:
                self.state.update(device_id=device_id, token=token, registered_at=time.time())
                self._save_state()
            self._online()
        return api

    def _call(self, fn: Callable[[ServerAPI], Any]) -> Any:
        """Run fn(api), re-registering once if the server forgot this device's token."""
        api = self.ensure_registered()
        try:
            result = fn(api)
        except ServerError as exc:
            if exc.reason != "unauthorized":
                raise
            with self._lock:
                for key in ("device_id", "token"):
                    self.state.pop(key, None)
                api.token = None
            api = self.ensure_registered()
            result = fn(api)
        self._online()
        return result

    # ================================================================== sync

    def sync(self) -> bool:
        """Download the current global model if it changed (conditional GET). True if installed."""
        if self.api is None:
            return False
        with self._net_lock:
            try:
                return self._sync()
            except Offline as exc:
                self._offline(exc)
                return False
            finally:
                self._done()

    def _sync(self) -> bool:
        etag = self.state.get("model_etag") if self.server_version() is not None else None
        self._progress(0.05, "checking for a new model")
        download = self._call(lambda api: api.download_model(etag=etag))
        self.state["last_sync"] = time.time()
        if download.status == 304 or download.data is None:
            self._save_state()
            return False
        installed = self._install_blob(download.data, download.etag)
        self._save_state()
        return installed

    def _server_identity(self, api: ServerAPI) -> tuple[ModelConfig, Vocabulary]:
        """The server's model config and vocabulary (fetched only if they differ from ours)."""
        info = api.model_info()
        config = api.model_config(info)
        vocab_hash = info.get("vocab_hash")
        local = self.models.vocab
        if local is not None and vocab_hash == local.content_hash() and len(local) == config.vocab_size:
            return config, local
        if self.model_cache is not None and vocab_hash:
            vocab = self.model_cache.vocab(vocab_hash, api.vocab)
        else:
            vocab = api.vocab()
        if vocab_hash and vocab.content_hash() != vocab_hash:
            raise ServerError(200, "vocab_hash_mismatch", "the vocabulary does not match the model info")
        return config, vocab

    def _install_blob(self, data: bytes, etag: str | None) -> bool:
        cached = self.model_cache.get(etag) if self.model_cache is not None else None
        if cached is not None:
            config, vocab, tensors, version = cached
        else:
            self._progress(0.5, "installing the new model")
            header = wire.decode(data, expected_kind="weights")
            config_local, vocab_local = self.models.config, self.models.vocab
            if (
                config_local is not None
                and header.config_hash == config_local.config_hash()
                and self.state.get("vocab_checked")
            ):
                config, vocab = config_local, vocab_local
            else:
                config, vocab = self._call(self._server_identity)
            payload = wire.decode(data, config, expected_kind="weights")
            tensors, version = list(payload.tensors), payload.model_version
            if self.model_cache is not None:
                self.model_cache.put(etag, (config, vocab, tensors, version))
        assert vocab is not None
        if self.server_version() == version and self.models.config == config and self.models.vocab == vocab:
            self.state["model_etag"] = etag
            self.state["vocab_checked"] = True
            return False
        self.models.install_global(config, vocab, tensors, version, {"source": "server", "etag": etag},
                                   persist=self.persist_models)
        self.state.update(model_etag=etag, vocab_checked=True, global_version=version, model_installed_at=time.time())
        log.info("installed global model version %s", version)
        return True

    def server_version(self) -> int | None:
        """The version of our global model if it came from this server (not the bundled initial one)."""
        bundle = self.models.bundle
        if bundle is None or bundle.meta.get("source") != "server" or not self.state.get("vocab_checked"):
            return None
        return bundle.model_version

    def _weights_for(self, version: int, url: str | None) -> list[np.ndarray]:
        """Weights of global model `version`: ours if current, else downloaded (and installed if newer)."""
        if self.server_version() == version:
            return self.models.global_weights
        download = self._call(lambda api: api.download_model(version=version, url=url))
        assert download.data is not None
        current = self.server_version()
        if current is None or version > current:
            self._install_blob(download.data, download.etag if download.version == version else None)
            self._save_state()
            return self.models.global_weights
        config = self.models.config
        payload = wire.decode(download.data, config, expected_kind="weights")
        return [np.array(t, dtype=np.float32) for t in payload.tensors]

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
            self._save_state()
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
                self._flush_pending()
                self._progress(0.02, "checking in")
                checkin: CheckIn = self._call(lambda api: api.check_in(elig.conditions(), self.server_version()))
                with self._lock:
                    self.state["last_checkin"] = time.time()
                    if checkin.retry_after is not None:
                        self.state["next_checkin_at"] = time.time() + checkin.retry_after
                if checkin.task is None:
                    if checkin.global_version is not None and checkin.global_version != self.server_version():
                        self._sync()
                    return Outcome("no_task", checkin.reason or "", info={"retry_after": checkin.retry_after})
                self.state.pop("next_checkin_at", None)
                task = checkin.task
                if task.type == "evaluate":
                    return self._run_eval_task(task, should_drop)
                if task.type == "train":
                    return self._run_train_task(task, should_drop, force=force)
                return Outcome("error", f"unknown task type {task.type!r}", task.round_id)
            except Offline as exc:
                self._offline(exc)
                return Outcome("offline", str(exc))
            except ServerError as exc:
                self._online()
                self.last_error = str(exc)
                return Outcome("rejected", f"{exc.reason}: {exc.detail}")
            finally:
                self._done()

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

    def _sync_identity_for(self, task: Task) -> None:
        if task.config_hash and self.models.config is not None and task.config_hash != self.models.config.config_hash():
            self._sync()

    def _run_train_task(self, task: Task, should_drop: Callable[[], bool] | None, *, force: bool) -> Outcome:
        from device_app.local_training import (  # TensorFlow only when training
            TrainingCancelled,
            compute_delta,
            examples_for,
            privatize,
            trainer_for,
        )

        rid = task.round_id
        hook = secagg_mod.choose(self.secure_aggregation, task.secure_aggregation)
        if task.secure_aggregation and hook is None:
            return Outcome("secagg_unsupported", "the round asks for secure aggregation this device cannot do", rid)
        if self.server_version() is None:
            self._sync()  # the bundled initial model is not the round's base: get the server's
        self._sync_identity_for(task)
        if not self.models.has_model or task.base_version is None:
            return Outcome("no_model", "no global model", rid)
        messages = self.store.training_messages()
        config, vocab = self.models.config, self.models.vocab
        assert config is not None and vocab is not None
        x, y = examples_for(messages, vocab, config.seq_len)
        if task.max_examples and len(x) > task.max_examples:
            x, y = x[-task.max_examples :], y[-task.max_examples :]
        if len(x) == 0:
            return Outcome("no_data", "no local text to train on yet", rid)
        self._progress(0.05, f"round {rid}: getting model {task.base_version}")
        base = self._weights_for(task.base_version, task.model_url)
        if hook is not None and hasattr(hook, "begin"):  # SecAgg: keys are exchanged before training
            self._progress(0.07, f"round {rid}: secure aggregation key exchange")
            try:
                self._call(lambda api: hook.begin(api, task))
            except secagg_mod.SecAggError as exc:
                self._log_sent({"type": "secagg", "round_id": rid, "status": "failed", "error": exc.reason})
                return Outcome("secagg_failed", f"{exc.reason}: {exc.detail}", rid)
        trainer = trainer_for(config)
        try:
            result = trainer.train(
                base, x, y, epochs=task.epochs, batch_size=task.batch_size, lr=task.learning_rate,
                seed=int(self.rng.integers(2**31)),
                progress=lambda f, msg: self._progress(0.1 + 0.8 * f, f"round {rid}: {msg}"),
                should_stop=self._stopper(should_drop, force),
            )
        except TrainingCancelled as exc:
            if hook is not None and hasattr(hook, "abort"):
                hook.abort(self.api, task)
            return Outcome("cancelled", str(exc), rid)
        self._progress(0.92, f"round {rid}: clipping and noising the update")
        delta = compute_delta(result.weights, base)
        private = privatize(delta, task.clip_norm, task.noise_stddev, self.rng)
        tensors, extra = private.delta, {}
        metrics = {
            "loss_first_epoch": result.loss_first_epoch,
            "loss_last_epoch": result.loss_last_epoch,
            "train_seconds": result.seconds,
        }
        metrics = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        if hook is not None and hasattr(hook, "submit"):
            if should_drop is not None and should_drop():
                if hasattr(hook, "abort"):
                    hook.abort(self.api, task)
                return Outcome("cancelled", "dropped out before uploading", rid)
            return self._secure_submit(hook, task, tensors, {"num_examples": int(result.num_examples),
                                                             "metrics": metrics}, private, result)
        if hook is not None:
            tensors, extra = self._call(lambda api: hook.protect(api, task, tensors))
        dtype = self.settings.upload_dtype if self.settings.upload_dtype in task.upload_dtypes else task.upload_dtypes[0]
        blob = wire.encode(
            tensors, config, kind="delta", model_version=task.base_version, dtype=dtype,
            metadata={"num_examples": int(result.num_examples), "metrics": metrics, **extra},
        )
        entry = {
            "type": "update",
            "round_id": rid,
            "base_version": task.base_version,
            "url": task.upload_url,
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "dtype": dtype,
            "num_examples": int(result.num_examples),
            "metrics": metrics,
            "dp_mode": task.dp_mode,
            "secure_aggregation": getattr(hook, "name", None),
            "deadline": task.deadline,
            **private.summary(),
            "training": result.summary(),
        }
        if should_drop is not None and should_drop():
            return Outcome("cancelled", "dropped out before uploading", rid)
        self._progress(0.95, f"round {rid}: uploading {len(blob) / 1e6:.1f} MB")
        return self._upload(rid, blob, entry, task.upload_url)

    def _secure_submit(self, hook: Any, task: Task, tensors: list[np.ndarray], metadata: dict[str, Any],
                       private: Any, result: Any) -> Outcome:
        """A protected upload (SecAgg masked vector, Paillier ciphertexts): the hook uploads and finishes
        its protocol. Synchronous with the round, so nothing waits in pending/ when the network fails."""
        rid = task.round_id
        entry = {"type": "update", "round_id": rid, "base_version": task.base_version, "dp_mode": task.dp_mode,
                 "secure_aggregation": hook.name, "num_examples": metadata["num_examples"],
                 "metrics": metadata["metrics"], "deadline": task.deadline, **private.summary(),
                 "training": result.summary()}
        self._progress(0.95, f"round {rid}: {hook.name} upload")
        try:
            answer = self._call(lambda api: hook.submit(api, task, tensors, metadata))
        except secagg_mod.SecAggError as exc:
            self._log_sent({**entry, "status": "failed", "error": exc.reason})
            return Outcome("secagg_failed", f"{exc.reason}: {exc.detail}", rid)
        except Offline as exc:
            self._offline(exc)
            self._log_sent({**entry, "status": "dropped", "error": "offline"})
            return Outcome("dropped", "offline during a secure-aggregation round", rid)
        self._log_sent({**entry, "status": "accepted", "bytes": answer.get("bytes"),
                        "sha256": answer.get("payload_sha256"), "timings": answer.get("timings")})
        with self._lock:
            self.state["contributions"] = int(self.state.get("contributions", 0)) + 1
            self.state["last_round"] = {"round_id": rid, "base_version": task.base_version, "at": time.time(),
                                        "num_examples": metadata["num_examples"], "clipped": entry["clipped"],
                                        "secure_aggregation": hook.name}
            self._save_state()
        return Outcome("uploaded", f"{answer.get('bytes')} bytes via {hook.name}", rid, info=answer)

    def _upload(self, rid: int, blob: bytes, entry: dict[str, Any], url: str | None) -> Outcome:
        try:
            answer = self._call(lambda api: api.upload_update(rid, blob, url=url))
        except Offline as exc:
            self._offline(exc)
            self._save_pending(rid, blob, entry)
            self._log_sent({**entry, "status": "pending"})
            return Outcome("pending", "offline: the update waits for the network until the round's deadline", rid)
        except ServerError as exc:
            self._online()
            status = "dropped" if exc.reason in FINAL_UPLOAD_REASONS else "rejected"
            self._log_sent({**entry, "status": status, "error": exc.reason})
            if status == "rejected" and exc.status >= 500:
                self._save_pending(rid, blob, entry)
                return Outcome("pending", f"server error {exc.reason}; will retry", rid)
            return Outcome(status, f"{exc.reason}: {exc.detail}", rid)
        self._log_sent({**entry, "status": "accepted"})
        with self._lock:
            self.state["contributions"] = int(self.state.get("contributions", 0)) + 1
            self.state["last_round"] = {"round_id": rid, "base_version": entry["base_version"], "at": time.time(),
                                        "num_examples": entry["num_examples"], "clipped": entry["clipped"]}
            self._save_state()
        return Outcome("uploaded", f"{entry['bytes']} bytes, {entry['num_examples']} examples", rid, info=answer)

    # ------------------------------------------------------------------ pending uploads

    def _save_pending(self, rid: int, blob: bytes, entry: dict[str, Any]) -> None:
        self.pending_dir.mkdir(exist_ok=True)
        (self.pending_dir / f"round-{rid}.fkw").write_bytes(blob)
        _write_json_atomic(self.pending_dir / f"round-{rid}.json", entry)

    def pending_uploads(self) -> list[int]:
        if not self.pending_dir.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.pending_dir.glob("round-*.json"))

    def _drop_pending(self, rid: int) -> None:
        for suffix in (".fkw", ".json"):
            try:
                (self.pending_dir / f"round-{rid}{suffix}").unlink()
            except FileNotFoundError:
                pass

    def _flush_pending(self) -> None:
        for rid in self.pending_uploads():
            entry = _read_json(self.pending_dir / f"round-{rid}.json", {})
            blob_path = self.pending_dir / f"round-{rid}.fkw"
            deadline = entry.get("deadline")
            if not blob_path.exists() or (deadline is not None and time.time() > float(deadline)):
                self._drop_pending(rid)
                self._log_sent({**entry, "status": "dropped", "error": "deadline_passed", "bytes_sent": 0})
                continue
            blob = blob_path.read_bytes()
            self._drop_pending(rid)
            outcome = self._upload(rid, blob, entry, entry.get("url"))
            log.info("pending upload of round %s: %s", rid, outcome)
            if outcome.status == "pending":
                raise Offline("still offline")

    def flush_pending(self) -> None:
        if self.api is None:
            return
        with self._net_lock:
            try:
                self._flush_pending()
            except Offline as exc:
                self._offline(exc)

    # ------------------------------------------------------------------ evaluation tasks

    def _run_eval_task(self, task: Task, should_drop: Callable[[], bool] | None) -> Outcome:
        from device_app.local_training import examples_for, trainer_for

        rid = task.round_id
        if self.server_version() is None:
            self._sync()
        self._sync_identity_for(task)
        if not self.models.has_model:
            return Outcome("no_model", "no global model", rid)
        config, vocab = self.models.config, self.models.vocab
        assert config is not None and vocab is not None
        heldout = self.store.split().heldout
        x, y = examples_for(heldout, vocab, config.seq_len)
        if int(np.count_nonzero(y)) == 0:
            return Outcome("no_data", "no held-back text to evaluate on", rid)
        versions = [v for v in (task.candidate_version, task.baseline_version) if v is not None]
        trainer = trainer_for(config)
        results = []
        for i, version in enumerate(versions):
            if should_drop is not None and should_drop():
                return Outcome("cancelled", "dropped out during evaluation", rid)
            self._progress(0.1 + 0.4 * i, f"evaluating model {version}")
            url = task.model_urls.get(str(version))
            download = self._call(lambda api: api.download_model(version=version, url=url))
            assert download.data is not None
            payload = wire.decode(download.data, config, expected_kind="weights")
            m = trainer.evaluate(list(payload.tensors), x, y)
            results.append({
                "model_version": int(version),
                "num_examples": int(m["tokens"]),
                "recall": float(m["top1_recall"]),
                "loss": float(m["loss"]),
                "metrics": {"top3_recall": float(m["top3_recall"])},
            })
        body_hash = hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()
        entry = {"type": "eval_report", "round_id": rid, "url": task.report_url, "sha256": body_hash, "results": results}
        try:
            self._call(lambda api: api.report_eval(rid, results, url=task.report_url))
        except ServerError as exc:
            self._log_sent({**entry, "status": "rejected", "error": exc.reason})
            return Outcome("rejected", f"{exc.reason}: {exc.detail}", rid)
        self._log_sent({**entry, "status": "accepted"})
        with self._lock:
            self.state["evaluations"] = int(self.state.get("evaluations", 0)) + 1
            self._save_state()
        return Outcome("reported", f"evaluated models {versions}", rid, info={"results": results})

    # ================================================================== privacy report

    def refresh_privacy(self) -> dict[str, Any] | None:
        """The population epsilon the server reports (None offline)."""
        if self.api is None:
            return None
        try:
            report = self._call(lambda api: api.privacy())
        except (Offline, ServerError) as exc:
            if isinstance(exc, Offline):
                self._offline(exc)
            return self.state.get("privacy")
        with self._lock:
            self.state["privacy"] = report
            self._save_state()
        return report

    # ================================================================== telemetry

    def report_telemetry(self) -> dict[str, Any] | None:
        """Answer the server's yes/no questions about this session by randomized response (device_app/
        telemetry.py); the session's facts are then forgotten. None offline or when refused."""
        if self.api is None:
            return None
        facts = self.session_facts.take()
        try:
            with self._net_lock:
                answer = self._call(lambda api: self.telemetry.report(api, facts))
        except (Offline, ServerError) as exc:
            if isinstance(exc, Offline):
                self._offline(exc)
            return None
        with self._lock:
            period = float((answer or {}).get("period_s") or 3600.0)
            self.state["next_telemetry_at"] = time.time() + period
            self._save_state()
        if answer is not None:
            self._log_sent({"type": "telemetry", "status": "accepted", "answers": answer["sent"],
                            "local_epsilon": self.telemetry.last.get("local_epsilon")})
        return answer

    # ================================================================== personalization

    def personalize_if_due(self) -> dict[str, Any] | None:
        if not self.settings.auto_personalize or not self.personalizer.due(self.store, self.models):
            return None
        return self.personalize()

    def personalize(self) -> dict[str, Any] | None:
        """Build the personal model now (None if there is not enough text yet)."""
        try:
            gain = self.personalizer.run(
                self.store, self.models, progress=self._progress, should_stop=self._cancel.is_set,
                seed=int(self.rng.integers(2**31)),
            )
        except ValueError as exc:
            self.last_error = str(exc)
            return None
        finally:
            self._done()
        with self._lock:
            self.state["personal_gain"] = gain
            self._save_state()
        return gain

    # ================================================================== forget

    def forget_data(self) -> None:
        """Delete the typed text, the personal model and any pending update derived from them."""
        with self._lock:
            self.store.forget()
            self.models.drop_personal()
            shutil.rmtree(self.pending_dir, ignore_errors=True)
            self.state.pop("personal_gain", None)
            self._save_state()
        self._log_sent({"type": "forget", "status": "local"})

    # ================================================================== log and status

    def _log_sent(self, entry: dict[str, Any]) -> None:
        entry = {"ts": time.time(), **entry}
        with self._lock, open(self.sent_log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True, default=float) + "\n")

    def sent_log(self) -> list[dict[str, Any]]:
        if not self.sent_log_path.exists():
            return []
        return [json.loads(line) for line in self.sent_log_path.read_text(encoding="utf-8").splitlines() if line.strip()]

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
            if time.time() >= float(self.state.get("next_telemetry_at", 0.0)) and self.session_facts.facts:
                if self.report_telemetry() is not None:
                    done.append("telemetry")
        if self.personalize_if_due() is not None:
            done.append("personalized")
        return done

    def close(self) -> None:
        self.cancel()
        if self._api is not None:
            self._api.close()
        self.store.close()

    def __enter__(self) -> "DeviceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ClientSettings", "DeviceClient", "ModelCache", "Outcome"]
