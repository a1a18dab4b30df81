"""Packed Paillier vs naive per-value Paillier (phe), per value encrypted, and what a gboard-size delta
costs end to end.

    .venv/bin/python benchmarks/bench_paillier.py                  # 2048-bit key, defaults below
    .venv/bin/python benchmarks/bench_paillier.py --naive-values 300 --packed-values 25200 --reps 3

What is measured (one process, one core; naive and packed alternate within each repetition so both
see the same machine load; medians over --reps):
* naive:   phe's PaillierPublicKey.encrypt(x) for each float x (phe encodes the float, then one
           2048-bit-exponent powmod per value, gmpy2-accelerated): --naive-values values
* packed:  models.paillier_pack: clamp + stochastic rounding to 24-bit offset integers, 63 per
           plaintext (32-bit slots: room for sums of 255 devices), one phe raw_encrypt per plaintext
           (the same gmpy2 powmod): --packed-values values
* packed-djn: the same packing, DJN encryption (fixed base h_s = (-x^2)^n, 1024-bit random exponent,
           8-bit windows of precomputed powers; table built once per key, timed separately)
* server:  homomorphic addition of one ciphertext (multiplication mod n^2, as phe's EncryptedNumber +)
* key holder: decryption of one ciphertext (phe raw_decrypt, CRT) and unpacking
Ratios are naive seconds per value / packed seconds per value. Extrapolations to a gboard delta
(1,422,638 values: 22,582 ciphertexts) and a 100-device round follow from the per-unit costs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phe import paillier  # noqa: E402

from models import paillier_pack as pp  # noqa: E402

GBOARD = 1_422_638


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key-bits", type=int, default=2048)
    ap.add_argument("--naive-values", type=int, default=200)
    ap.add_argument("--packed-values", type=int, default=63 * 200)
    ap.add_argument("--devices", type=int, default=100, help="devices per round for the extrapolation")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output", default=str(ROOT / "artifacts" / "bench" / "paillier.json"))
    args = ap.parse_args()

    t = time.perf_counter()
    pub, priv = paillier.generate_paillier_keypair(n_length=args.key_bits)
    keygen_s = time.perf_counter() - t
    key = pp.PublicKey(pub.n, pp.djn_base(pub.n))
    packing = pp.choose_packing(1.0, 0.1, args.packed_values, 130, key_bits=args.key_bits, value_bits=24)
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.01, args.packed_values)
    naive_values = [float(v) for v in values[: args.naive_values]]
    std = pp.Encryptor(key, "standard")
    djn = pp.Encryptor(key, "djn")
    t = time.perf_counter()
    djn._table = djn._build_table()
    djn_table_s = time.perf_counter() - t

    naive, packed, packed_djn = [], [], []
    for rep in range(args.reps):
        t = time.perf_counter()
        for v in naive_values:
            pub.encrypt(v)
        naive.append((time.perf_counter() - t) / len(naive_values))
        t = time.perf_counter()
        cts, _ = pp.encrypt_delta(values, packing, std, rng)
        packed.append((time.perf_counter() - t) / len(values))
        t = time.perf_counter()
        cts_djn, _ = pp.encrypt_delta(values, packing, djn, rng)
        packed_djn.append((time.perf_counter() - t) / len(values))
        print(f"rep {rep + 1}: naive {naive[-1] * 1e3:.3f} ms/value, packed {packed[-1] * 1e6:.1f} us/value, "
              f"packed-djn {packed_djn[-1] * 1e6:.2f} us/value", flush=True)

    # server addition and key-holder decryption per ciphertext
    acc = [int(c) for c in cts]
    t = time.perf_counter()
    for _ in range(5):
        acc = pp.add_into(acc, cts_djn, key.nsquare)
    add_s = (time.perf_counter() - t) / (5 * len(cts))
    t = time.perf_counter()
    plains = [priv.raw_decrypt(int(c)) for c in acc]
    decrypt_s = (time.perf_counter() - t) / len(acc)
    t = time.perf_counter()
    pp.dequantize_sum(pp.unpack(plains, packing), 7, packing)
    unpack_s = (time.perf_counter() - t) / len(acc)

    n_med, p_med, d_med = statistics.median(naive), statistics.median(packed), statistics.median(packed_djn)
    g = pp.choose_packing(1.0, 0.1, GBOARD, 130, key_bits=args.key_bits)
    report = {
        "key_bits": args.key_bits, "keygen_s": keygen_s, "values_per_ciphertext": packing.slots,
        "slot_bits": packing.slot_bits, "value_bits": packing.value_bits,
        "naive_s_per_value": n_med, "packed_s_per_value": p_med, "packed_djn_s_per_value": d_med,
        "ratio_naive_over_packed": n_med / p_med, "ratio_naive_over_packed_djn": n_med / d_med,
        "djn_table_s": djn_table_s, "server_add_s_per_ciphertext": add_s, "decrypt_s_per_ciphertext": decrypt_s,
        "unpack_s_per_ciphertext": unpack_s,
        "gboard": {
            "values": GBOARD, "ciphertexts": g.n_ciphertexts, "upload_bytes": g.n_ciphertexts * g.ct_bytes,
            "device_encrypt_s_naive": n_med * GBOARD, "device_encrypt_s_packed": p_med * GBOARD,
            "device_encrypt_s_packed_djn": d_med * GBOARD + djn_table_s,
            f"server_add_s_{args.devices}_devices": add_s * g.n_ciphertexts * args.devices,
            "keyholder_decrypt_s": (decrypt_s + unpack_s) * g.n_ciphertexts,
        },
        "reps": {"naive": naive, "packed": packed, "packed_djn": packed_djn},
        "cpus": os.cpu_count(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "reps"}, indent=2))
    print(f"packed vs naive per value: {report['ratio_naive_over_packed']:.1f}x (standard Paillier), "
          f"{report['ratio_naive_over_packed_djn']:.0f}x (DJN fixed base)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
