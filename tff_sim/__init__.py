"""Gboard-style federated training of the keyboard model in TensorFlow Federated (see README.md).

    python -m tff_sim --help

config (SimConfig, flags, config files) -> client_data (per-client examples and datasets)
-> process (TFF FedAvg / DP-FedAvg / evaluation; dp_aggregators, nesterov) -> runner (the loop:
sampling, privacy, checkpoint, report, export, push). plain_fedavg is the same FedAvg without
TFF, the benchmarks' reference. reaper ends TFF's worker_binary on every exit path.
"""
