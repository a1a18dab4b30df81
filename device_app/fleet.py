"""Fleet mode: N simulated devices in one process against a real server, for demos and load tests.

    python -m device_app --headless --fleet 50 --dataset chitchat --server http://127.0.0.1:8080 --rounds 3

Each simulated device is a full DeviceClient (own data dir, SQLite text store, registration,
check-ins, local training, clipping, noise, uploads) that replays one real user's messages of
the dataset as typing, oldest first. Every step a device types a few messages, then is
eligible (charging, unmetered, idle) with probability `p_eligible`; an eligible device whose
retry-after has passed checks in, and with probability `p_dropout` drops out of its task
(stops training, never uploads), like a phone unplugged mid-round.

The devices share what a real fleet would not need to duplicate in one process: one decoded
copy of each global model (ModelCache), one Keras trainer per model config, one HTTP
connection pool. Retry-after waits are honoured but capped at `max_wait_s`, so a demo does
not sit out the server's 10-minute pace steering.

Over https, `ca_file` or `pin_sha256` (--ca-file / --pin-sha256) set how that shared client verifies
the server (device_app/transport.py); plain http:// is refused unless the server is on this machine.

No silent waits: every `progress_s` seconds the fleet prints where the round it waits on stands
(device_app/fleet_progress.py: round, state, secure-aggregation stage, updates submitted of the goal),
and a `workers` value it has to replace is announced with the reason.
"""
from __future__ import annotations

import heapq
import json
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from device_app.client import ClientSettings, DeviceClient, ModelCache, Outcome
from device_app.eligibility import Eligibility, EligibilitySettings
from device_app.fleet_progress import RoundSeen, round_progress
from device_app.personalize import PersonalizationSettings
from device_app.tls_transport import make_transport
from device_app.transport import check_settings
from models import interrupts

log = logging.getLogger("device_app.fleet")


@dataclass
class FleetConfig:
    server_url: str
    n_devices: int = 10
    dataset: str = "chitchat"
    # whose messages the devices type: all training users, only the federated ones (not the donors,
    # whose text pre-trains the model), or only the donors (models/data/donors.py, docs/donors.md)
    population: str = "all"
    rounds: int | None = None  # stop after the global model advanced this many versions
    duration_s: float | None = None  # or after this long (default: 10 min when rounds is None)
    p_eligible: float = 0.7
    p_dropout: float = 0.1
    initial_messages: int = 20  # typed before the first check-in
    messages_per_step: int = 3
    step_s: float = 0.5  # pause between a device's steps
    max_wait_s: float = 5.0  # cap on the server's retry-after
    workers: int = 4
    progress_s: float = 5.0  # a progress line this often while the fleet runs (0: none)
    seed: int = 0
    personalize: bool = False
    data_dir: str | None = None  # default: a temporary directory, deleted afterwards
    keep_data: bool = False
    ca_file: str | None = None  # verify the https server with this CA file (device_app/transport.py)
    pin_sha256: str | None = None  # or: trust exactly the certificate with this SHA-256 fingerprint
    registration_key: str | None = None  # the server's registration key (None: $FK_REGISTRATION_KEY)

    def to_dict(self) -> dict[str, Any]:
        """For reports: the registration key masked."""
        return asdict(self) | {"registration_key": "***" if self.registration_key else None}


@dataclass
class FleetReport:
    config: dict[str, Any]
    seconds: float = 0.0
    devices: int = 0
    start_version: int | None = None
    end_version: int | None = None
    checkins: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    uploads_per_round: dict[int, int] = field(default_factory=dict)
    dropouts_per_round: dict[int, int] = field(default_factory=dict)
    messages_typed: int = 0
    train_seconds: float = 0.0
    upload_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False  # stopped by Ctrl-C before its rounds / duration were done

    @property
    def rounds_advanced(self) -> int:
        if self.start_version is None or self.end_version is None:
            return 0
        return self.end_version - self.start_version

    def summary(self) -> dict[str, Any]:
        uploads = sum(self.uploads_per_round.values())
        per_round = list(self.uploads_per_round.values())
        return {
            "devices": self.devices,
            "seconds": round(self.seconds, 2),
            "start_version": self.start_version,
            "end_version": self.end_version,
            "rounds_advanced": self.rounds_advanced,
            "checkins": self.checkins,
            "outcomes": dict(sorted(self.outcomes.items())),
            "uploads": uploads,
            "uploads_per_s": round(uploads / self.seconds, 3) if self.seconds else 0.0,
            "uploads_per_round": {str(k): v for k, v in sorted(self.uploads_per_round.items())},
            "dropouts_per_round": {str(k): v for k, v in sorted(self.dropouts_per_round.items())},
            "mean_devices_per_round": round(float(np.mean(per_round)), 2) if per_round else 0.0,
            "messages_typed": self.messages_typed,
            "train_seconds": round(self.train_seconds, 2),
            "upload_mb": round(self.upload_bytes / 1e6, 2),
            "errors": self.errors[:20],
            "interrupted": self.interrupted,
            "config": self.config,
        }


class SimulatedDevice:
    """One DeviceClient replaying one user's messages."""

    def __init__(self, index: int, client_id: str, messages: list[str], client: DeviceClient, rng: np.random.Generator) -> None:
        self.index = index
        self.client_id = client_id
        self.messages = messages
        self.cursor = 0
        self.client = client
        self.rng = rng
        self.next_action = 0.0

    def type_messages(self, n: int) -> int:
        typed = 0
        while typed < n and self.cursor < len(self.messages):
            self.client.commit(self.messages[self.cursor])
            self.cursor += 1
            typed += 1
        return typed

    def draw_eligibility(self, p_eligible: float) -> Eligibility:
        # Each condition holds with p^(1/3), so all three hold with probability p.
        p = p_eligible ** (1.0 / 3.0) if p_eligible > 0 else 0.0
        c, u, i = (bool(self.rng.random() < p) for _ in range(3))
        return Eligibility(charging=c, unmetered=u, idle=i, participate=True)


class Fleet:
    def __init__(self, config: FleetConfig, *, dataset: Any = None, on_event: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_event = on_event or (lambda msg: log.info(msg))
        self._dataset = dataset
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.report = FleetReport(config=config.to_dict())
        self.devices: list[SimulatedDevice] = []
        self._tmp: str | None = None
        self._http: httpx.Client | None = None
        self._version_seen: int | None = None
        self._last_round: RoundSeen | None = None  # the latest round a device reported on
        self._started = 0.0

    # ------------------------------------------------------------------ setup

    def _load_users(self) -> list[tuple[str, list[str]]]:
        ds = self._dataset
        if ds is None:
            from models.data import load_dataset

            ds = load_dataset(self.config.dataset)
        from models.data.types import seeded_order

        ids = seeded_order(ds.population_ids(self.config.population), self.config.seed, "fleet")
        if not ids:
            raise ValueError(f"dataset {self.config.dataset!r} has no training clients"
                             + ("" if self.config.population == "all" else f" in population {self.config.population!r}"))
        users = []
        for i in range(self.config.n_devices):
            cid = ids[i % len(ids)]
            c = ds.clients[cid]
            users.append((cid, [*c.train, *c.test]))
        return users

    def setup(self) -> None:
        cfg = self.config
        who = "" if cfg.population == "all" else f" {cfg.population}"
        self.on_event(f"setting up {cfg.n_devices} devices typing {cfg.dataset}{who} users' messages")
        # the URL policy and TLS settings, refused before any directory or connection exists
        ca_file, pin = check_settings(cfg.server_url, cfg.ca_file, cfg.pin_sha256)
        root = Path(cfg.data_dir) if cfg.data_dir else Path(tempfile.mkdtemp(prefix="fk-fleet-"))
        if not cfg.data_dir:
            self._tmp = str(root)
        root.mkdir(parents=True, exist_ok=True)
        self._http = httpx.Client(
            timeout=httpx.Timeout(60.0, connect=10.0),
            transport=make_transport(
                ca_file=ca_file, pin_sha256=pin,
                # a cap, not a pool size: room for every device's long-poll when the server runs SecAgg
                limits=httpx.Limits(max_connections=max(8, cfg.workers * 2, cfg.n_devices + 8),
                                    max_keepalive_connections=max(8, cfg.workers * 2))),
        )
        cache = ModelCache()
        seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.n_devices)
        for i, (cid, messages) in enumerate(self._load_users()):
            settings = ClientSettings(
                server_url=cfg.server_url,
                ca_file=ca_file,  # recorded for status(); the shared client above does the verifying
                pin_sha256=pin,
                registration_key=cfg.registration_key,
                eligibility=EligibilitySettings(idle_after_s=0.0, use_battery_sensor=False),
                personalization=PersonalizationSettings(),
                auto_personalize=cfg.personalize,
                sync_interval_s=30.0,
            )
            client = DeviceClient(
                root / f"device-{i:05d}", settings=settings, http_client=self._http, model_cache=cache,
                persist_models=False, save_settings=False, seed=int(seeds[i].generate_state(1)[0]),
                initial_bundle=False,  # fleet devices start from the server's model
            )
            rng = np.random.default_rng(seeds[i])
            device = SimulatedDevice(i, cid, messages, client, rng)
            self.report.messages_typed += device.type_messages(cfg.initial_messages)
            device.next_action = time.monotonic() + float(rng.uniform(0, cfg.step_s))
            self.devices.append(device)
        self.report.devices = len(self.devices)

    def close(self) -> None:
        for d in self.devices:
            d.client.close()
        if self._http is not None:
            self._http.close()
        if self._tmp and not self.config.keep_data:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------------ running

    def _note_version(self, version: int | None) -> None:
        if version is None:
            return
        with self._lock:
            if self.report.start_version is None:
                self.report.start_version = version
            if self.report.end_version is None or version > self.report.end_version:
                if self.report.end_version is not None:
                    self.on_event(f"global model version {version}")
                self.report.end_version = version
            if self.config.rounds is not None and self.report.rounds_advanced >= self.config.rounds:
                self._stop.set()

    def _record(self, device: SimulatedDevice, outcome: Outcome, dropped: bool) -> None:
        with self._lock:
            r = self.report
            r.outcomes[outcome.status] = r.outcomes.get(outcome.status, 0) + 1
            if outcome.status not in ("ineligible",):
                r.checkins += 1
            if outcome.status == "uploaded" and outcome.round_id is not None:
                r.uploads_per_round[outcome.round_id] = r.uploads_per_round.get(outcome.round_id, 0) + 1
                entry = device.client.sent_log()[-1]
                r.upload_bytes += int(entry.get("bytes", 0))
                r.train_seconds += float(entry.get("training", {}).get("train_seconds", 0.0))
            if dropped and outcome.round_id is not None:
                r.dropouts_per_round[outcome.round_id] = r.dropouts_per_round.get(outcome.round_id, 0) + 1
            if outcome.status in ("error", "rejected"):
                r.errors.append(f"device {device.index}: {outcome}")
            last = self._last_round
            if outcome.round_id is not None and (last is None or outcome.round_id >= last.round_id):
                protocol = last.protocol if last is not None and last.round_id == outcome.round_id else None
                self._last_round = RoundSeen(outcome.round_id, protocol, 0)

    def step(self, device: SimulatedDevice) -> None:
        cfg = self.config
        client = device.client
        with self._lock:
            self.report.messages_typed += device.type_messages(int(device.rng.integers(1, cfg.messages_per_step + 1)))
        if not client.models.has_model or client.due_for_sync():
            client.sync()
            self._note_version(client.models.global_version)
        elig = device.draw_eligibility(cfg.p_eligible)
        if not elig.eligible:
            self._record(device, Outcome("ineligible"), False)
            return
        if not client.due_for_checkin():
            return
        drop = bool(device.rng.random() < cfg.p_dropout)
        outcome = client.participate_once(eligibility=elig, should_drop=(lambda: drop))
        self._record(device, outcome, drop and outcome.status == "cancelled")
        self._note_version(client.models.global_version)
        if cfg.personalize:
            client.personalize_if_due()

    def _worker(self, heap: list[tuple[float, int]], heap_lock: threading.Lock, deadline: float) -> None:
        cfg = self.config
        while not self._stop.is_set() and time.monotonic() < deadline:
            with heap_lock:
                if not heap:
                    return
                when, idx = heapq.heappop(heap)
            delay = when - time.monotonic()
            if delay > 0:
                if self._stop.wait(min(delay, max(0.0, deadline - time.monotonic()))):
                    break
            device = self.devices[idx]
            try:
                self.step(device)
            except Exception as exc:  # noqa: BLE001 - one device's failure must not stop the fleet
                log.exception("device %d failed", idx)
                with self._lock:
                    self.report.errors.append(f"device {idx}: {exc.__class__.__name__}: {exc}")
            wait = cfg.step_s * float(device.rng.uniform(0.5, 1.5))
            retry_at = float(device.client.state.get("next_checkin_at", 0.0)) - time.time()
            if retry_at > 0:
                wait = max(wait, min(retry_at, cfg.max_wait_s))
                if retry_at > cfg.max_wait_s:  # cap the server's pace steering for the simulation
                    device.client.state["next_checkin_at"] = time.time() + cfg.max_wait_s
            with heap_lock:
                heapq.heappush(heap, (time.monotonic() + wait, idx))

    def _watch_server(self, deadline: float) -> None:
        """Follow the server's global version (public /healthz) to know when rounds complete, and print
        a progress line every progress_s seconds (on a fixed schedule, however long a poll takes)."""
        assert self._http is not None
        url = self.config.server_url.rstrip("/") + "/healthz"
        every = self.config.progress_s
        next_line = time.monotonic() + every
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._note_version(self._http.get(url, timeout=5.0).json().get("global_version"))
            except (httpx.HTTPError, ValueError):
                pass
            if every > 0 and time.monotonic() >= next_line:
                self.on_event(self.progress_line())
                next_line += every
                if next_line < time.monotonic():  # a slow server: keep the pace, do not burst to catch up
                    next_line = time.monotonic() + every
            self._stop.wait(0.25)

    def round_in_progress(self) -> RoundSeen | None:
        """The newest round a device is working on now, else the last one a device reported on."""
        tasks = [t for t in (d.client.current_task for d in self.devices) if t is not None]
        if tasks:
            rid = max(t.round_id for t in tasks)
            protocol = next(((t.secure_aggregation or {}).get("protocol") for t in tasks
                             if t.round_id == rid and t.secure_aggregation), None)
            seen = RoundSeen(rid, protocol, sum(t.round_id == rid for t in tasks))
            with self._lock:
                self._last_round = RoundSeen(rid, protocol, 0)
            return seen
        with self._lock:
            return self._last_round

    def progress_line(self) -> str:
        """Where the round the fleet waits on stands (asked as one of its devices)."""
        link = self.devices[0].client.link if self.devices else None
        seen = self.round_in_progress()
        with self._lock:
            version = self.report.end_version
        if link is None:
            return "no devices yet"
        return round_progress(link.call, seen, version)

    def _worker_count(self) -> int:
        """cfg.workers, or one thread per device when the server runs secure aggregation: an admitted
        device then waits inside the protocol's stages for the others, and a round whose devices cannot
        all be in it at once would fail (too few keys advertised)."""
        workers = self.config.workers
        try:
            protocol = self.devices[0].client.ensure_registered().model_info().get("secure_aggregation") or "none"
        except Exception:  # noqa: BLE001 - offline now: the configured count
            return workers
        if protocol != "none" and workers < len(self.devices):
            self.on_event(f"--workers {workers} raised to {len(self.devices)}: secure aggregation ({protocol}) needs "
                          "a worker per device that may be admitted (one per device), since an admitted device waits "
                          "in its stages for the others")
            return len(self.devices)
        return workers

    def run(self) -> FleetReport:
        """Drive the devices until the rounds or the duration are done, or Ctrl-C / SIGTERM (then every
        device stops at its next training batch or step, and the report says interrupted)."""
        self._started = time.monotonic()
        try:
            self._run()
        except BaseException as exc:
            interrupts.stop_code(exc)  # anything but the stop propagates
            self.report.interrupted = True
            self.on_event("interrupted: the devices stopped after their current step")
        finally:
            self._stop.set()
            self.report.seconds = time.monotonic() - self._started
        return self.report

    def _stop_devices(self) -> None:
        self._stop.set()
        for device in self.devices:
            device.client.cancel()  # training in progress stops at its next batch

    def _run(self) -> None:
        cfg = self.config
        if not self.devices:
            self.setup()
        duration = cfg.duration_s if cfg.duration_s is not None else (600.0 if cfg.rounds is None else 3600.0)
        self._started = time.monotonic()  # the run's clock starts once the devices exist
        deadline = self._started + duration
        # The first sync of every device: all share one download decode through the ModelCache.
        for device in self.devices:
            device.client.sync()
            self._note_version(device.client.models.global_version)
        self.on_event(f"{len(self.devices)} devices ready at global version {self.report.start_version}")
        heap = [(d.next_action, d.index) for d in self.devices]
        heapq.heapify(heap)
        heap_lock = threading.Lock()
        workers = self._worker_count()
        watcher = threading.Thread(target=self._watch_server, args=(deadline,), name="fleet-watch", daemon=True)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleet")
        try:
            watcher.start()
            futures = [pool.submit(self._worker, heap, heap_lock, deadline) for _ in range(workers)]
            for f in futures:
                f.result()
        finally:  # whatever ends the run (Ctrl-C included), the workers are told before they are waited for
            self._stop_devices()
            pool.shutdown(wait=True, cancel_futures=True)
            watcher.join(5.0)


def run_fleet(config: FleetConfig, *, dataset: Any = None, on_event: Callable[[str], None] | None = None) -> FleetReport:
    fleet = Fleet(config, dataset=dataset, on_event=on_event)
    try:
        return fleet.run()  # sets up the devices first, inside its Ctrl-C handling
    finally:
        fleet.close()


def format_report(report: FleetReport) -> str:
    return json.dumps(report.summary(), indent=2, sort_keys=True)


__all__ = ["Fleet", "FleetConfig", "FleetReport", "SimulatedDevice", "format_report", "run_fleet"]
