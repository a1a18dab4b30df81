"""The Paillier key holder's own logic (no HTTP): its key pair, kept in <data-dir>/keyholder_key.json
(0600), its signature over the public key, and the decryption of an aggregate with the refusals that
guard it (below --min-count, another key, a second aggregate for the same round). Every decryption is
logged to <data-dir>/decryptions.jsonl before the plaintexts go out. The process around it (FastAPI
app and CLI) is server/keyholder.py.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from server.paillier.protocol import REQUEST_MAGIC, RESPONSE_MAGIC


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


__all__ = ["KeyHolder", "KeyHolderRefusal"]
