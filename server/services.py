"""Where the server's services are built and handed to each other (the one place that wires them).

    Db, Store, Metrics                 persistence (SQLite or PostgreSQL rows; blobs in the data dir) and counters
    RoundManager (+ ModelVersions, PrivacyAccount, RoundCloser)   rounds: locking, persistence, scheduling
    SecAggService, PaillierService secure-aggregation protocols: attached to the manager by name,
                                       reached by a round's strategy (server/strategy/factory.py)
    Telemetry                          randomized-response counts
    AdminOps, Reporter                 admin changes of the model line; read-only views

The HTTP app (server/app.py) takes a Services and only routes requests to them.
"""
from __future__ import annotations

import dataclasses

from server.admin_ops import AdminOps
from server.config import ServerConfig
from server.db import Db
from server.metrics import Metrics
from server.paillier import PaillierService
from server.reporting import Reporter
from server.rounds import RoundManager
from server.secagg import SecAggService
from server.store import Store
from server.telemetry import Telemetry
from server.versions import ModelVersions


@dataclasses.dataclass
class Services:
    config: ServerConfig
    manager: RoundManager
    secagg: SecAggService
    paillier: PaillierService
    telemetry: Telemetry
    admin: AdminOps
    reporter: Reporter

    @property
    def db(self) -> Db:
        return self.manager.db

    @property
    def metrics(self) -> Metrics:
        return self.manager.metrics

    @property
    def models(self) -> ModelVersions:
        return self.manager.models


def build_services(config: ServerConfig) -> Services:
    config.data_path.mkdir(parents=True, exist_ok=True)
    db, store, metrics = Db(config.db_target, shared=config.cluster), Store(config.data_path), Metrics()
    manager = RoundManager(config, db, store, metrics)
    secagg = SecAggService(config, db, store, manager, metrics)
    paillier = PaillierService(config, db, store, manager, metrics)
    telemetry = Telemetry(db, config)
    for name, protocol in (("secagg", secagg), ("paillier", paillier)):
        manager.attach_protocol(name, protocol)
        manager.attach_background(protocol)
    return Services(config, manager, secagg, paillier, telemetry, AdminOps(manager),
                    Reporter(manager, telemetry.summary))


__all__ = ["Services", "build_services"]
