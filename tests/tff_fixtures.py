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


class FedAvgComparison:
    """The TFF learning process of `cfg` and plain FedAvg (Keras clients + models.fedavg with the same server
    optimizer) from the same initial weights: the setup of the tests that check TFF computes exactly FedAvg.
    Each round, feed both `cohort(r)`; then `assert_same_weights()`."""

    def __init__(self, cfg: Any, data: Any) -> None:
        from models import fedavg
        from tff_sim import process
        from tff_sim.plain_fedavg import KerasClientTrainer

        self.cfg, self.data = cfg, data
        mc = data.model_config
        self.w0 = process.initial_weights(mc, cfg.seed)
        self.learning = process.build_learning_process(cfg, mc)
        self.state = process.initialize(self.learning, self.w0)
        self.trainer = KerasClientTrainer(mc, cfg.client_lr)
        self.server = fedavg.build_server_optimizer(cfg.fedavg)
        self.plain = fedavg.server_init(self.w0, self.server)

    def cohort(self, r: int) -> tuple[list[Any], list[Any]]:
        """Round r's uniformly sampled clients (1 epoch, batch 16, at most 32 examples each): their TFF
        datasets and, in the same order, their batches for the plain clients."""
        from tff_sim import client_data, sampling

        cfg, data = self.cfg, self.data
        ids = sampling.sample_clients(data.train_ids, r, cfg.seed, cfg.clients_per_round, "uniform")
        return ([client_data.client_dataset(data.train[c], r, cfg.seed, 1, 16, 32) for c in ids],
                [client_data.client_batches(data.train[c], r, cfg.seed, 1, 16, 32) for c in ids])

    def assert_same_weights(self, atol: float = 2e-5) -> list[Any]:
        """The TFF process' weights equal plain FedAvg's (within atol); returns the TFF weights."""
        import numpy as np

        from tff_sim import process

        tff_weights = process.get_weights_from_state(self.learning, self.state)
        for a, b in zip(tff_weights, self.plain.weights):
            np.testing.assert_allclose(a, b, atol=atol)
        return tff_weights
