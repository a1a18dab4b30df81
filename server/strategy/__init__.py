"""Aggregation strategies (base.py), the aggregators (mean.py), DP mechanisms as wrappers (dp.py), and the
factory that builds a round's wrapped strategy from its parameters (factory.py)."""
from server.strategy.base import (Aggregate, DecodedUpdate, LedgerEvent, RoundContext, SecureProtocol, Strategy,
                                  UploadBound, check_norm, parse_metadata, quantization_error_bound)
from server.strategy.dp import CentralDP, DistributedDP, DPStrategy, FtrlDP, FtrlTree, LocalDP, device_view_epsilon
from server.strategy.factory import strategy_for
from server.strategy.mean import Robust, SecureSum, StreamingMean

__all__ = ["Aggregate", "DecodedUpdate", "LedgerEvent", "RoundContext", "SecureProtocol", "Strategy", "UploadBound",
           "check_norm", "parse_metadata", "quantization_error_bound", "CentralDP", "DistributedDP", "DPStrategy",
           "FtrlDP", "FtrlTree", "LocalDP", "device_view_epsilon", "strategy_for", "Robust", "SecureSum", "StreamingMean"]
