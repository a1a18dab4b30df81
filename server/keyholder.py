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
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

log = logging.getLogger("server.keyholder")

REQUEST_MAGIC = b"FKPD"
RESPONSE_MAGIC = b"FKPR"


class KeyHolder:
    def __init__(self, data_dir: str | os.PathLike, token: str, min_count: int, key_bits: int = 2048) -> None:
        from phe import paillier

        from models import paillier_pack as pp
        from models import secagg_math as sm

        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.min_count = int(min_count)
        self._lock = threading.Lock()
        path = self.data_dir / "keyholder_key.json"
        if path.exists():
            data = json.loads(path.read_text())
            n, p, q = int(data["n"], 16), int(data["p"], 16), int(data["q"], 16)
            pub = paillier.PaillierPublicKey(n)
            self.private = paillier.PaillierPrivateKey(pub, p, q)
            self.djn_hs = int(data["djn_hs"], 16)
            self.signing_key = bytes.fromhex(data["signing_key"])
        else:
            pub, self.private = paillier.generate_paillier_keypair(n_length=key_bits)
            self.djn_hs = pp.djn_base(pub.n)
            self.signing_key, _ = sm.ed25519_keypair()
            data = {"n": format(pub.n, "x"), "p": format(self.private.p, "x"), "q": format(self.private.q, "x"),
                    "djn_hs": format(self.djn_hs, "x"), "signing_key": self.signing_key.hex()}
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self.key = pp.PublicKey(n=pub.n, djn_hs=self.djn_hs)
        self.verify_key = sm.ed25519_public(self.signing_key)
        self.signature = sm.sign(self.signing_key, self.key.signed_message())
        self.decrypted: dict[str, str] = {}  # round id -> sha256 of the aggregate it decrypted
        self.log_path = self.data_dir / "decryptions.jsonl"
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.decrypted[str(entry["round_id"])] = entry["sha256"]

    def public_key(self) -> dict[str, Any]:
        from models import secagg_math as sm

        return {**self.key.to_dict(), "signature": sm.b64(self.signature), "verify_key": sm.b64(self.verify_key)}

    def decrypt(self, body: bytes) -> bytes:
        from models import privacy_wire

        header, payload, sha = privacy_wire.unframe(REQUEST_MAGIC, body)
        round_id, count = header.get("round_id"), header.get("count")
        if not isinstance(count, int) or count < self.min_count:
            raise KeyHolderRefusal(403, "below_min_count",
                                   f"the aggregate holds {count!r} contributions; at least {self.min_count} required")
        if header.get("key_id") != self.key.key_id:
            raise KeyHolderRefusal(400, "wrong_key", f"aggregate is under key {header.get('key_id')!r}")
        width = (2 * self.key.key_bits + 7) // 8
        n_ct = header.get("n_ct")
        if header.get("ct_bytes") != width or not isinstance(n_ct, int) or len(payload) != n_ct * width:
            raise KeyHolderRefusal(400, "bad_request", "ciphertext count or width does not match the payload")
        with self._lock:
            prev = self.decrypted.get(str(round_id))
            if prev is not None and prev != sha:
                raise KeyHolderRefusal(409, "already_decrypted",
                                       f"round {round_id} was already decrypted (a different aggregate)")
            self.decrypted[str(round_id)] = sha
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"round_id": round_id, "count": count, "sha256": sha, "n_ct": n_ct,
                                    "at": time.time()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        data = bytes(payload)
        n2 = self.key.nsquare
        pwidth = (self.key.key_bits + 7) // 8
        out = []
        for i in range(n_ct):
            c = int.from_bytes(data[i * width:(i + 1) * width], "big")
            if not 0 < c < n2:
                raise KeyHolderRefusal(400, "bad_request", f"ciphertext {i} out of range")
            out.append(self.private.raw_decrypt(c).to_bytes(pwidth, "big"))
        return privacy_wire.frame(RESPONSE_MAGIC, {"round_id": round_id, "n": n_ct, "width": pwidth}, b"".join(out))


class KeyHolderRefusal(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


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
