"""Paillier rounds as pure functions: the round's packing, the task, the input header check, and the
key holder's messages (request frame out, plaintext slots back into the float64 sum of the deltas).
Math: models/paillier_pack.py. I/O: server/paillier/service.py and keyholder_client.py.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from models import paillier_pack as pp
from models import privacy_wire
from server.errors import Rejection, SecureAggregationFailed
from server.round import Round
from server.strategy import UploadBound

REQUEST_MAGIC = b"FKPD"  # server -> key holder: the encrypted sum of a round
RESPONSE_MAGIC = b"FKPR"  # key holder -> server: its plaintext slots


def packing_for(rnd: Round, bound: UploadBound, dim: int, key_bits: int) -> pp.Packing:
    p = rnd.train
    return pp.choose_packing(p.clip_norm, bound.noise_stddev, dim, p.max_admitted, key_bits,
                             int(p.paillier_value_bits), float(p.norm_sigmas))


def task_params(rnd: Round, public_key: dict[str, Any], keyholder_url: str | None, packing: pp.Packing
                ) -> dict[str, Any]:
    """The "secure_aggregation" part of a Paillier round's train task."""
    return {"protocol": pp.PROTOCOL, "version": pp.PROTOCOL_VERSION, "round_id": rnd.id, "public_key": public_key,
            "keyholder_url": keyholder_url, "packing": packing.to_dict(),
            "upload_url": f"/v1/rounds/{rnd.id}/paillier/input"}


def max_input_bytes(packing: pp.Packing) -> int:
    return packing.n_ciphertexts * packing.ct_bytes + (1 << 16)


def check_header(header: Mapping[str, Any], rid: int, key_id: str, device_id: str) -> None:
    if header.get("round_id") != rid or header.get("key_id") != key_id or header.get("device_id") != device_id:
        raise Rejection("bad_metadata", "ciphertexts are for another round, key or device")


def decrypt_request(rid: int, count: int, key_id: str, packing: pp.Packing, encrypted_sum: bytes) -> bytes:
    return privacy_wire.frame(REQUEST_MAGIC, {"round_id": rid, "count": count, "key_id": key_id,
                                              "n_ct": packing.n_ciphertexts, "ct_bytes": packing.ct_bytes},
                              encrypted_sum)


def sum_from_response(response: bytes, count: int, packing: pp.Packing) -> np.ndarray:
    """The float64 sum of the deltas from the key holder's plaintexts; a range violation (an altered
    ciphertext decrypts to garbage) is SecureAggregationFailed."""
    header, payload, _ = privacy_wire.unframe(RESPONSE_MAGIC, response)
    width = header["width"]
    data = bytes(payload)
    plains = [int.from_bytes(data[i * width:(i + 1) * width], "big") for i in range(header["n"])]
    total, ok = pp.dequantize_sum(pp.unpack(plains, packing), count, packing)
    if not ok:
        raise SecureAggregationFailed("paillier_integrity", "decrypted sum out of range: a ciphertext was altered")
    return total


def summary(row: Mapping[str, Any]) -> dict[str, Any]:
    p: pp.Packing = row["packing"]
    return {"protocol": pp.PROTOCOL, "key_id": row["key_id"], "slots_per_ciphertext": p.slots,
            "ciphertexts": p.n_ciphertexts, "value_bits": p.value_bits, "contributions": row["sum_count"],
            **row["info"]}


__all__ = ["REQUEST_MAGIC", "RESPONSE_MAGIC", "check_header", "decrypt_request", "max_input_bytes", "packing_for",
           "sum_from_response", "summary", "task_params"]
