"""python -m device_app: the keyboard app, a headless device, or a fleet of simulated devices.

    python -m device_app                                  # the Kivy keyboard (portrait window)
    python -m device_app --server http://127.0.0.1:8080   # ... talking to a server
    python -m device_app --headless --server URL --type-file notes.txt --once
    python -m device_app --headless --server URL          # a device that keeps participating
    python -m device_app --headless --suggest "see you to"
    python -m device_app --headless --fleet 20 --dataset chitchat --server URL --rounds 3
    python -m device_app --screenshot shot.png --type "see you to"   # render the app once, exit
    python -m device_app --headless --server https://fk.example:8443 --pin-sha256 AA:BB:...   # over TLS

The device data dir defaults to $FK_DEVICE_DIR or ~/.fk-device. The bundled initial model
(used until the server's global model arrives, and offline) is --bundle, $FK_INITIAL_BUNDLE,
or the first bundle found in device_app/assets/initial_model and models/pretrained/small (the committed
default: trained on the donors' text only, `python -m models.pretrained`).

Transport security: plain http:// is refused to any host but this machine (127.0.0.1, ::1,
localhost). Over https the device verifies the server with the system CAs, --ca-file PEM (chain
and hostname), or --pin-sha256 HEX (exactly the certificate with that SHA-256, as
`python -m server --tls-self-signed` prints it; checked before anything is sent). Both are saved
with the server URL in the data dir's settings.json, so later runs and the app keep using them.

Registration: the server wants its registration key (the operator hands it out: <server data dir>/
registration_key unless set); --registration-key KEY or $FK_REGISTRATION_KEY. It is saved with the
server URL. The data dir is private (0700; state.json with the token and text.db with the typed text 0600).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from models import interrupts


def default_data_dir() -> Path:
    return Path(os.environ.get("FK_DEVICE_DIR") or Path.home() / ".fk-device")


class _Parser(argparse.ArgumentParser):
    """Checks the server URL and TLS flags together (device_app/transport.py): a refused URL or a bad
    pin is a usage error before anything starts, in every mode (app, headless, fleet)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "server", None) or getattr(ns, "ca_file", None) or getattr(ns, "pin_sha256", None):
            from device_app.transport import TransportPolicyError, check_settings

            try:
                ns.ca_file, ns.pin_sha256 = check_settings(ns.server, ns.ca_file, ns.pin_sha256)
            except TransportPolicyError as exc:
                self.error(str(exc))
        return ns, rest


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m device_app", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="server URL, e.g. http://127.0.0.1:8080 (default: the saved one, or offline)")
    p.add_argument("--ca-file", help="verify the https server with this PEM CA file (saved with the server URL)")
    p.add_argument("--pin-sha256", metavar="HEX", help="trust exactly the server certificate with this SHA-256 "
                                                       "fingerprint (AA:BB:.. or hex; saved with the server URL)")
    p.add_argument("--registration-key", help="the server's registration key (saved with the server URL; "
                                              "default $FK_REGISTRATION_KEY)")
    p.add_argument("--data-dir", type=Path, default=None, help="device data dir (default $FK_DEVICE_DIR or ~/.fk-device)")
    p.add_argument("--bundle", help="initial model bundle directory (used until a server model arrives)")
    p.add_argument("--headless", action="store_true", help="no UI")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between background chores (default 30)")
    p.add_argument("--once", action="store_true", help="headless: one round of chores, print status, exit")
    p.add_argument("--type-file", type=Path, help="headless: type these lines (one message per line) first")
    p.add_argument("--suggest", metavar="TEXT", help="headless: print suggestions for TEXT and exit")
    p.add_argument("--forget", action="store_true", help="delete this device's typed text and personal model, then exit")
    p.add_argument("--verbose", "-v", action="store_true")
    fleet = p.add_argument_group("fleet mode (--headless --fleet N)")
    fleet.add_argument("--fleet", type=int, metavar="N", help="simulate N devices against --server")
    fleet.add_argument("--dataset", default="chitchat", help="whose messages the devices type (default chitchat)")
    fleet.add_argument("--population", default="all", choices=("all", "federated", "donors"),
                       help="which training users the devices replay: all (default), only the federated ones "
                            "(not the donors), or only the donors (docs/donors.md)")
    fleet.add_argument("--rounds", type=int, help="stop after the global model advanced this many versions")
    fleet.add_argument("--duration", type=float, help="stop after this many seconds")
    fleet.add_argument("--p-eligible", type=float, default=0.7, help="chance a device is eligible at a step")
    fleet.add_argument("--p-dropout", type=float, default=0.1, help="chance a device drops out of a task")
    fleet.add_argument("--workers", type=int, default=4,
                       help="threads driving the devices (one per device when the server runs SecAgg)")
    fleet.add_argument("--progress-every", type=float, default=5.0, metavar="S",
                       help="print where the current round stands every S seconds (0: never)")
    fleet.add_argument("--step", type=float, default=0.5, help="seconds between a device's steps")
    fleet.add_argument("--max-wait", type=float, default=5.0, help="cap on the server's retry-after (seconds)")
    fleet.add_argument("--seed", type=int, default=0)
    fleet.add_argument("--personalize", action="store_true", help="fleet devices also build personal models")
    fleet.add_argument("--json-out", type=Path, help="write the fleet report here")
    ui = p.add_argument_group("app")
    ui.add_argument("--size", default="360x640", help="window size WxH (default 360x640, portrait)")
    ui.add_argument("--screenshot", type=Path, help="render the app, save a PNG here, print the suggestions, exit")
    ui.add_argument("--type", dest="type_text", default="", help="with --screenshot: text typed before the shot")
    ui.add_argument("--status-screen", action="store_true", help="with --screenshot: shoot the status screen")
    return p


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def _make_client(args: argparse.Namespace):
    from device_app.client import DeviceClient

    from device_app.transport import TransportPolicyError

    data_dir = args.data_dir or default_data_dir()
    try:
        return DeviceClient(data_dir, args.server, initial_bundle=args.bundle, ca_file=args.ca_file,
                            pin_sha256=args.pin_sha256, registration_key=args.registration_key)
    except TransportPolicyError as exc:  # e.g. a saved http:// URL to another machine
        print(f"python -m device_app: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_fleet_cli(args: argparse.Namespace) -> int:
    from device_app.fleet import FleetConfig, format_report, run_fleet

    if not args.server:
        print("fleet mode needs --server URL", file=sys.stderr)
        return 2
    config = FleetConfig(
        server_url=args.server, n_devices=args.fleet, dataset=args.dataset, rounds=args.rounds,
        duration_s=args.duration, p_eligible=args.p_eligible, p_dropout=args.p_dropout, workers=args.workers,
        step_s=args.step, max_wait_s=args.max_wait, seed=args.seed, personalize=args.personalize,
        data_dir=str(args.data_dir) if args.data_dir else None, keep_data=args.data_dir is not None,
        ca_file=args.ca_file, pin_sha256=args.pin_sha256, progress_s=args.progress_every,
        population=args.population, registration_key=args.registration_key,
    )
    report = run_fleet(config, on_event=lambda msg: print(f"[fleet] {msg}", flush=True))
    text = format_report(report)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    return interrupts.acknowledge() if report.interrupted else 0


def run_headless(args: argparse.Namespace) -> int:
    client = _make_client(args)
    try:
        if args.forget:
            client.forget_data()
            print("forgot the typed text and the personal model")
            return 0
        if args.suggest is not None:
            print(json.dumps(client.suggest(args.suggest)))
            return 0
        if args.type_file:
            lines = args.type_file.read_text(encoding="utf-8").splitlines()
            typed = sum(client.commit(line, typed_now=False) for line in lines)
            print(f"typed {typed} messages")
        if args.once:
            done = client.tick()
            client.refresh_privacy()
            print(json.dumps({"done": done, "status": client.status()}, indent=2, default=str))
            return 0
        interrupts.install(on_request=lambda _: client.cancel())  # training stops at its next batch
        print(f"headless device in {client.data_dir}; server {client.settings.server_url or '(offline)'}; Ctrl-C stops")
        while True:
            for item in client.tick():
                print(f"{time.strftime('%H:%M:%S')} {item}", flush=True)
            interrupts.stop_event().wait(args.interval)
            interrupts.check()
    finally:
        client.close()


def run_app(args: argparse.Namespace) -> int:
    size = _size(args.size)
    if args.screenshot:
        from device_app.ui.app import screenshot

        client = _make_client(args)
        try:
            result = screenshot(client, args.screenshot, text=args.type_text, size=size, status_screen=args.status_screen)
        finally:
            client.close()
        print(json.dumps(result))
        return 0
    from device_app.ui.app import run

    client = _make_client(args)
    try:
        run(client, size=size, interval_s=args.interval)
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    interrupts.install()  # Ctrl-C / SIGTERM: exit 130 / 143 in every phase, with the cleanup of each mode
    try:
        return _main(argv)
    except BaseException as exc:
        code = interrupts.stop_code(exc)
        print(f"\ninterrupted ({exc})", file=sys.stderr, flush=True)
        return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.fleet is not None:
        if not args.headless:
            print("--fleet runs headless; add --headless", file=sys.stderr)
        return run_fleet_cli(args)
    if args.headless:
        return run_headless(args)
    return run_app(args)


if __name__ == "__main__":
    sys.exit(main())
