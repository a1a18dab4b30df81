"""The Paillier key holder: a process separate from the aggregation server that owns the private key.

    python -m server.keyholder --port 8090 --data-dir keyholder_data --token s3cret --min-count 10
    python -m server.keyholder --port 0 --port-file /tmp/kh.port --data-dir /tmp/kh --token t --key-bits 2048

It publishes the public key and decrypts only aggregates the aggregation server submits:

GET  /healthz
GET  /v1/public_key   none      {n, djn_hs, key_bits, key_id, signature, verify_key}  (the Ed25519
                                signature of the key holder over (n, djn_hs); devices pin verify_key)
POST /v1/decrypt      Bearer    binary frame b"FKPD": header {round_id, count, key_id, n_ct, ct_bytes},
                                payload n_ct big-endian ciphertexts -> frame b"FKPR": plaintexts
                                (big-endian, key_bits/8 bytes each)

Refusals (JSON {"error", "detail"}): 401 unauthorized (wrong token), 403 below_min_count (the server
says the aggregate holds fewer than --min-count contributions), 409 already_decrypted (another
aggregate for a round id it already decrypted; the identical request is answered again, so a server
that crashed mid-aggregation can retry), 400 for malformed input, wrong key id.

Trust assumptions (documented, not enforced by cryptography): the key holder and the aggregation
server do not collude (together they can decrypt any single device's ciphertexts); the key holder
trusts the server's contribution count (a lying server could submit one device's ciphertext as a
"sum of 100"; devices' signatures over their ciphertexts, checked here, would close that gap at the
cost of shipping every individual ciphertext to the key holder); one decryption per round id stops
the simple differencing attack (sum of all minus sum of all-but-one) within a round, not across
rounds a dishonest server invents, which is why Paillier rounds still add distributed DP noise.
Every decryption is logged to <data-dir>/decryptions.jsonl (round id, count, SHA-256 of the input).
The key holder's logic is server/paillier/keyholder_core.py; this module is its HTTP app and CLI.
"""
from __future__ import annotations

import argparse
import hmac
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.paillier.keyholder_core import KeyHolder, KeyHolderRefusal
from server.paillier.protocol import REQUEST_MAGIC, RESPONSE_MAGIC

log = logging.getLogger("server.keyholder")


def create_app(holder: KeyHolder):
    from models.privacy_wire import FrameError

    app = FastAPI(title="Paillier key holder", description=__doc__)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "key_id": holder.key.key_id}

    @app.get("/v1/public_key")
    def public_key() -> dict[str, Any]:
        return holder.public_key()

    @app.post("/v1/decrypt")
    async def decrypt(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {holder.token}".encode()):
            return JSONResponse({"error": "unauthorized", "detail": "bad key-holder token"}, status_code=401)
        body = await request.body()
        try:
            out = await run_in_threadpool(holder.decrypt, body)
        except KeyHolderRefusal as exc:
            log.warning("refused to decrypt: %s", exc.detail)
            return JSONResponse({"error": exc.reason, "detail": exc.detail}, status_code=exc.status)
        except FrameError as exc:
            return JSONResponse({"error": exc.reason, "detail": exc.detail}, status_code=400)
        return Response(out, media_type="application/octet-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.keyholder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--port-file")
    ap.add_argument("--data-dir", default="keyholder_data")
    ap.add_argument("--token", default=os.environ.get("FK_KEYHOLDER_TOKEN"),
                    help="bearer token the aggregation server presents ($FK_KEYHOLDER_TOKEN)")
    ap.add_argument("--min-count", type=int, default=2, help="fewest contributions an aggregate must hold")
    ap.add_argument("--key-bits", type=int, default=2048)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    if not args.token:
        print("python -m server.keyholder: --token (or $FK_KEYHOLDER_TOKEN) is required", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    holder = KeyHolder(args.data_dir, args.token, args.min_count, args.key_bits)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, args.port_file)
    log.info("key holder %s listening on http://%s:%d", holder.key.key_id, args.host, port)
    uvicorn.Server(uvicorn.Config(create_app(holder), log_level=args.log_level, access_log=False)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["KeyHolder", "KeyHolderRefusal", "create_app", "main", "REQUEST_MAGIC", "RESPONSE_MAGIC"]
