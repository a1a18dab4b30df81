"""python -m server: run the aggregation server.

    python -m server --port 8080 --data-dir server_data --init-bundle artifacts/baselines/bundle
    python -m server --port 0 --port-file /tmp/port --data-dir /tmp/d --init-preset tiny --admin-token s3cret

Every ServerConfig field is a flag (--round-goal 100, --dp-mode distributed, --no-training-on-start ...);
--config FILE.json sets several at once (flags win). --port 0 binds a free port; --port-file writes it.
--init-bundle / --init-preset only act on a data dir that has no model yet.
The store is <data-dir>/server.sqlite3 unless --database postgresql://... selects PostgreSQL (the blobs stay
in the data dir either way; docs/scaling.md, "Running on PostgreSQL"). --cluster lets several server processes
serve one fleet on that database and a data dir they share (one aggregates, by lease; /healthz says which).
HTTPS: --tls-cert FILE --tls-key FILE, or --tls-self-signed (created once in the data dir; its path and
SHA-256 fingerprint are printed for the devices' --ca-file / --pin-sha256).
DP settings whose noise would swamp the model (a round's expected noise norm on the mean of min_count
updates above --max-noise-to-clip, default 10, times the clip; server/dp_sanity.py) are refused at start-up
with the numbers and the knobs to turn; --allow-noisy-dp starts anyway, with a warning.
"""
from __future__ import annotations

import os

# One BLAS thread: the server's dot products are small, and OpenBLAS's idle worker threads spin in
# sched_yield, which on a small machine eats a quarter of the CPU that upload handling needs.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import dataclasses
import logging
import socket
import ssl
import sys
import types
import typing
from pathlib import Path

from server import runtime_tuning, tls
from server.config import KEY_ALIASES, REGISTRATION_KEY_FILE, ServerConfig

log = logging.getLogger("server")


def _flag_type(hint: typing.Any):
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(base) is tuple:
        return str, "+"
    return base, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with ServerConfig fields")
    parser.add_argument("--init-bundle", help="model bundle directory to initialise an empty data dir from")
    parser.add_argument("--init-preset", help="model preset (tiny, small, gboard) to initialise an empty data dir with "
                                              "random numpy weights")
    parser.add_argument("--vocab-file", help="vocabulary JSON for --init-preset (default: synthetic placeholder words)")
    parser.add_argument("--port-file", help="write the bound port here once listening (useful with --port 0)")
    hints = typing.get_type_hints(ServerConfig)
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        # other spellings of the same setting (--adam-eps for --eps, --client-lr for --learning-rate)
        aliases = ["--" + a.replace("_", "-") for a, name in KEY_ALIASES.items() if name == field.name]
        typ, nargs = _flag_type(hints[field.name])
        if typ is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, *aliases, dest=field.name, type=typ, nargs=nargs, default=None)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)
                 if getattr(args, f.name) is not None}
    if args.config:
        config = ServerConfig.from_file(args.config, **overrides)
    else:
        config = ServerConfig(**overrides)
    return config.with_env()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only for IPPROTO_TCP
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _tls_files(config: ServerConfig) -> tuple[Path, Path] | None:
    """(certificate, key) to serve HTTPS with, or None for plain HTTP. Creates the self-signed pair on
    first use and prints its fingerprint: the operator hands it (or the file) to the devices."""
    if config.tls_self_signed:
        cert, key, created = tls.ensure_self_signed(config.data_dir, config.host)
    elif config.tls_cert and config.tls_key:
        cert, key, created = Path(config.tls_cert), Path(config.tls_key), False
    else:
        return None
    tls.check_pair(cert, key)  # a clear error now rather than a traceback from inside uvicorn
    fingerprint = tls.fingerprint_sha256(tls.load_certificate(cert))
    kind = ("created a self-signed" if created else "self-signed") if config.tls_self_signed else "serving"
    # printed, not only logged: the operator needs it whatever the log level
    print(f"TLS: {kind} certificate {cert.resolve()}\n"
          f"TLS: SHA-256 fingerprint {tls.format_fingerprint(fingerprint)}\n"
          f"TLS: devices verify with --ca-file {cert.resolve()} or --pin-sha256 {fingerprint}", flush=True)
    return cert, key


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"python -m server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime_tuning.tune_all()

    import uvicorn

    from server import bootstrap, dp_sanity
    from server.app import create_app
    from server.db_dialect import StoreUnavailable
    from server.services import build_services

    try:
        services = build_services(config)
    except StoreUnavailable as exc:  # a bad or unreachable --database: say so, no traceback
        print(f"python -m server: {exc}", file=sys.stderr)
        return 2
    models = services.models
    if not models.initialized and (args.init_bundle or args.init_preset):
        if args.init_bundle:
            model_config, vocab, weights, info = bootstrap.from_bundle(args.init_bundle)
        else:
            model_config, vocab, weights, info = bootstrap.from_preset(args.init_preset, args.vocab_file, config.seed)
        # the DP noise check before the model is stored: a refused start leaves the data dir as it was
        if (refusal := dp_sanity.startup_refusal(config, model_config.num_parameters())) is not None:
            print(f"python -m server: refusing to start: {refusal}", file=sys.stderr)
            return 2
        models.initialize(model_config, vocab, weights, info)
    else:
        if models.initialized and (args.init_bundle or args.init_preset):
            log.info("data dir already holds a model (config %s); --init-* ignored", models.model_config.config_hash())
        elif not models.initialized:
            log.warning("no model yet: devices are told to retry until an admin calls POST /v1/admin/init")
        if (refusal := dp_sanity.startup_refusal(config, models.dim if models.initialized else None)) is not None:
            print(f"python -m server: refusing to start: {refusal}", file=sys.stderr)
            return 2

    if config.dp_mode in ("central", "distributed", "local") and config.selection_q is None:
        log.warning("dp_mode %s without --selection-q: no secret cohort draw, so epsilon is accounted with no "
                    "amplification by sampling (q = 1: every device in every round)", config.dp_mode)
    try:
        tls_files = _tls_files(config)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"python -m server: cannot serve HTTPS: {exc}", file=sys.stderr)
        return 2
    app = create_app(config, services)
    if config.admin_token is None:
        log.info("admin token: see %s", Path(config.data_dir) / "admin_token")
    key_file = Path(config.data_dir) / REGISTRATION_KEY_FILE
    if config.registration_key and key_file.exists() and key_file.read_text(encoding="utf-8").strip() == config.registration_key:
        log.info("registration key: see %s (devices pass it: --registration-key or $FK_REGISTRATION_KEY)", key_file)
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, args.port_file)
    scheme = "https" if tls_files else "http"
    log.info("listening on %s://%s:%d (data dir %s, %s store %s)", scheme, config.host, port, config.data_dir,
             services.db.engine, services.db.dialect.describe())
    ssl_files = {"ssl_certfile": str(tls_files[0]), "ssl_keyfile": str(tls_files[1])} if tls_files else {}
    server = uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, access_log=False,
                                           timeout_keep_alive=30, limit_concurrency=None, **ssl_files))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
