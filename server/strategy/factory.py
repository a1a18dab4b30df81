"""The one place a round's frozen parameters become its strategy: aggregator, secure protocol, DP wrapper."""
from __future__ import annotations

from typing import Mapping

from server.round import TrainParams
from server.strategy.base import SecureProtocol, Strategy
from server.strategy.dp import CentralDP, DistributedDP, FtrlDP, FtrlTree, LocalDP
from server.strategy.mean import Robust, SecureSum, StreamingMean

DP_WRAPPERS = {"central": CentralDP, "distributed": DistributedDP, "local": LocalDP}


def strategy_for(params: TrainParams, protocols: Mapping[str, SecureProtocol] | None = None,
                 ftrl_tree: FtrlTree | None = None) -> Strategy:
    """The wrapped strategy of a training round. `protocols`: the secure-aggregation services by name;
    `ftrl_tree`: DP-FTRL's durable noise tree (server/ftrl.py), needed by dp_mode ftrl."""
    if params.secure_aggregation != "none":
        if not protocols or params.secure_aggregation not in protocols:
            raise RuntimeError(f"no {params.secure_aggregation} service")
        inner: Strategy = SecureSum(params.secure_aggregation, protocols[params.secure_aggregation])
    elif params.aggregator == "mean":
        inner = StreamingMean()
    else:
        inner = Robust(params.aggregator)
    if params.dp_mode == "none":
        return inner
    if params.dp_mode == "ftrl":
        return FtrlDP(inner, ftrl_tree)
    return DP_WRAPPERS[params.dp_mode](inner)


__all__ = ["strategy_for", "DP_WRAPPERS"]
