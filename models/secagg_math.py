"""The math of secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"; the neighbour graph of SecAgg+, Bell et al. 2020).
Shared by the server (server/secagg/) and the device (device_app/secagg.py); numpy + the
`cryptography` package, nothing else (no TensorFlow). `cryptography` is imported by the functions
that use it (keys, signatures, AES): the keyboard imports this module at start (device_app/secagg.py)
but loads cryptography only when a SecAgg or Paillier round first needs it.

One module past 500 lines on purpose: the server's and the device's halves of the protocol must use
the very same encodings (share framing, quantization bounds, PRG expansion); keeping them in one file
keeps one definition of each.

Protocol sketch (one training round; the server relays, the devices compute):

    advertise_keys  every device u: two X25519 key pairs (c: share encryption, s: mask agreement),
                    public halves signed with u's registered Ed25519 identity key -> U1
    share_keys      u draws a self-mask seed b_u, Shamir-shares b_u and s_sk_u among its holders
                    (itself and its neighbours in U1) with threshold t, and sends each share
                    AES-GCM-encrypted under the pairwise key KA(c_sk_u, c_pk_v) -> U2
    masked_input    u uploads y_u = q_u + PRG(b_u) + sum_{v in N(u) cap U2} sign(u, v) PRG(s_uv)  (mod 2^bits)
                    with s_uv = KA(s_sk_u, s_pk_v) and sign(u, v) = +1 if u < v else -1 -> U3
    consistency     u signs U3; nobody reveals anything before t signatures on the same U3
    unmasking       each survivor reveals, for every v in U3 it holds shares of, its share of b_v,
                    and for every v in U2 \\ U3 its share of s_sk_v (never both for one v)
    server          sum_{u in U3} y_u - sum_{u in U3} PRG(b_u) - (the masks dropped devices left in)
                    = sum_{u in U3} q_u  (mod 2^bits), lifted to signed integers, de-quantized.

Quantization (the bound that keeps the modular sum from wrapping)
-----------------------------------------------------------------
A device's clipped delta has ||x||_2 <= clip, so every coordinate |x_i| <= clip; its Gaussian noise
coordinate |n_i| <= sigma * (sqrt(2 ln(2 d)) + sigmas) for all d coordinates except with
probability <= 2d * exp(-(sqrt(2 ln 2d) + sigmas)^2 / 2) < exp(-sigmas^2 / 2) (1.5e-8 for sigmas = 6).
So B = clip + sigma * (sqrt(2 ln(2 d)) + sigmas) bounds every coordinate; devices clamp to [-B, B]
anyway (an honest device is never changed beyond that probability). With

    limit = floor((2^(bits-1) - 1) / 2^headroom_bits),   qmax = floor(limit / n_max),   scale = qmax / B,

each device's integers q_i = stochastic_round(x_i * scale) lie in [-qmax, qmax], and the sum of up to
n_max devices lies in [-limit, limit], strictly inside the signed range of the ring Z_{2^bits}: the
modular sum lifted to (-2^(bits-1), 2^(bits-1)] IS the integer sum, exactly. The headroom bits are
an integrity check: a sum that still carries a mask (a corrupted masked vector, a wrong share) is
uniform in the ring, so each such coordinate lands inside [-n qmax, n qmax] with probability below
2^-headroom_bits, and the server refuses a sum with any coordinate outside (check_range).
Stochastic rounding is unbiased (E[q_i] = x_i * scale); its error, at most 1/scale per coordinate,
is far below the DP noise (for gboard, clip 1, z = 1, 100 devices: 1/scale ~ 2e-5 vs sigma ~ 0.1).

Shamir shares live in the prime field GF(2^521 - 1): a 32-byte secret is one field element.
The PRG is AES-256-CTR (zero nonce; every seed is used for exactly one expansion) read as
little-endian uint32/uint64 words.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import itertools
import math
import os
import secrets
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from models import privacy_wire

PROTOCOL = "secagg"
PROTOCOL_VERSION = 1
PRIME = (1 << 521) - 1  # Mersenne prime M521
SHARE_BYTES = 66  # ceil(521 / 8)
KEY_BYTES = 32
BITS = (32, 64)
MASKED_MAGIC = b"FKSA"
_RING_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_SIGNED_DTYPES = {32: np.dtype("<i4"), 64: np.dtype("<i8")}


class SecAggMathError(ValueError):
    pass


# =========================================================================== Shamir secret sharing


def shamir_split(secret: int, xs: Sequence[int], t: int,
                 randbelow: Callable[[int], int] = secrets.randbelow) -> dict[int, int]:
    """Shares f(x) for each x in xs of a random polynomial f of degree t - 1 with f(0) = secret."""
    if not 0 <= secret < PRIME:
        raise SecAggMathError("secret must be a field element")
    if not 1 <= t <= len(xs):
        raise SecAggMathError(f"threshold {t} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggMathError("share points must be distinct and non-zero")
    coeffs = [secret] + [randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = acc
    return out


def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_j with f(0) = sum_j l_j f(x_j) for any f of degree < len(xs)."""
    if any(x % PRIME == 0 for x in xs):
        raise SecAggMathError("interpolation points must be distinct and non-zero")
    return lagrange_at(xs, 0)


@functools.lru_cache(maxsize=1024)
def lagrange_at(xs: tuple[int, ...], x: int) -> tuple[int, ...]:
    """Coefficients l_j with f(x) = sum_j l_j f(x_j) for any f of degree < len(xs) (x not among xs)."""
    if len(set(xs)) != len(xs) or x in xs:
        raise SecAggMathError("interpolation points must be distinct and differ from x")
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (x - xm) % PRIME
                den = den * (xj - xm) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def shamir_reconstruct_checked(shares: Mapping[int, int], t: int, accept: Callable[[int], bool],
                               max_tries: int = 2048) -> tuple[int, list[int]]:
    """(f(0), the share points not on f) from shares that may include bad ones (a cheating revealer).

    The honest case costs one interpolation: the first t shares, if `accept` (the commitment or public-key
    check) takes their secret; unused shares are then not checked. Otherwise the other t-subsets are tried,
    those with the fewest later points first (at most `max_tries`), until one reconstructs an accepted
    secret; every other share is then checked against that polynomial and the points off it are returned.
    SecAggMathError when no subset of t shares is accepted (too many bad shares, or fewer than t)."""
    xs_all = sorted(shares)
    if len(xs_all) < t:
        raise SecAggMathError(f"{len(shares)} shares, {t} needed")

    def secret_of(xs: tuple[int, ...]) -> int:
        return sum(c * shares[x] for c, x in zip(lagrange_at_zero(xs), xs)) % PRIME

    value = secret_of(tuple(xs_all[:t]))
    if accept(value):
        return value, []
    tries = 1
    # Every other t-subset exactly once: at level k, the (t + k)-th point with t - 1 of the points before it
    # (the subsets of the first t + k - 1 points were all tried at the levels below).
    for k in range(1, len(xs_all) - t + 1):
        head, new = xs_all[:t + k - 1], xs_all[t + k - 1]
        for keep in itertools.combinations(head, t - 1):
            if tries >= max_tries:
                raise SecAggMathError(f"no accepted secret within {max_tries} subsets of the shares")
            tries += 1
            subset = keep + (new,)
            value = secret_of(subset)
            if accept(value):
                bad = [x for x in xs_all if x not in subset
                       and sum(c * shares[y] for c, y in zip(lagrange_at(subset, x), subset)) % PRIME != shares[x]]
                return value, bad
    raise SecAggMathError("no subset of the shares reconstructs an accepted secret (too many bad shares)")


def shamir_reconstruct(shares: Mapping[int, int], t: int) -> int:
    """f(0) from the first t shares (by x). Fewer than t shares: SecAggMathError."""
    if len(shares) < t:
        raise SecAggMathError(f"{len(shares)} shares, {t} needed")
    xs = tuple(sorted(shares)[:t])
    coeffs = lagrange_at_zero(xs)
    return sum(c * shares[x] for c, x in zip(coeffs, xs)) % PRIME


def secret_to_int(secret: bytes) -> int:
    if len(secret) != KEY_BYTES:
        raise SecAggMathError(f"secrets are {KEY_BYTES} bytes")
    return int.from_bytes(secret, "big")


def int_to_secret(value: int) -> bytes:
    if not 0 <= value < (1 << (8 * KEY_BYTES)):
        raise SecAggMathError("reconstructed value is not a 32-byte secret (wrong or tampered shares)")
    return value.to_bytes(KEY_BYTES, "big")


def share_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise SecAggMathError(f"a share is {SHARE_BYTES} bytes")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise SecAggMathError("share is not a field element")
    return value


# =========================================================================== keys and key agreement


def x25519_keypair() -> tuple[bytes, bytes]:
    """(private raw 32 bytes, public raw 32 bytes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()),
            sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def x25519_public(private: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hkdf(material: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(material)


X25519_P = (1 << 255) - 19
# The canonical encodings of the points of small order (order 1, 2, 4 or 8) on Curve25519 and its twist:
# 0, 1, the two points of order 8, p - 1. X25519 with any of them gives an all-zero shared secret (a key
# "agreement" everyone, the server included, knows); their non-canonical aliases (u + p, u with the top
# bit set) are refused as non-canonical below.
X25519_LOW_ORDER = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
))
_PROBE_SK = bytes([0x48] + [0x11] * 30 + [0x40])  # a fixed clamped scalar: X25519 with it is a pure function


def x25519_key_problem(public: bytes) -> str | None:
    """Why `public` is not an acceptable X25519 public key (None when it is): wrong length, a non-canonical
    encoding (top bit set, or u >= 2^255 - 19: an alias of another point), or a point of small order (its
    shared secret with anyone is all zeros). The low-order list is checked, and then an actual exchange
    with a fixed scalar, so that no alias the list might miss slips through."""
    if len(public) != KEY_BYTES:
        return f"not {KEY_BYTES} bytes"
    u = int.from_bytes(public, "little")
    if u >> 255:
        return "non-canonical encoding (top bit set)"
    if u >= X25519_P:
        return "non-canonical encoding (u >= 2^255 - 19)"
    if public in X25519_LOW_ORDER:
        return "a point of small order"
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    try:
        X25519PrivateKey.from_private_bytes(_PROBE_SK).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return "a point of small order (all-zero shared secret)"
    return None


def agreed_key(private: bytes, peer_public: bytes, label: bytes, context: bytes) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public), label | context): the same on both sides."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # low-order point: an all-zero shared secret
        raise SecAggMathError(f"key agreement failed: {exc}") from None
    return _hkdf(shared, b"fk-secagg-v1|" + label + b"|" + context)


def round_context(session: str, round_id: int) -> bytes:
    """What every derived key, signature and ciphertext of a round is bound to."""
    return f"{session}|{int(round_id)}".encode()


def ed25519_keypair() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sk = Ed25519PrivateKey.generate()
    return (sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()),
            sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def ed25519_public(private: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(private: bytes, message: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except Exception:  # InvalidSignature, malformed key or signature
        return False


def advertise_message(session: str, round_id: int, device_id: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a device signs when it advertises its round keys: binds them to the round and to itself."""
    return b"|".join([b"fk-secagg-v1", b"advertise", round_context(session, round_id), device_id.encode(),
                      c_pk.hex().encode(), s_pk.hex().encode()])


def consistency_message(session: str, round_id: int, u3: Sequence[str]) -> bytes:
    """What a survivor signs in the consistency check: the exact set of masked inputs the server used."""
    return b"|".join([b"fk-secagg-v1", b"consistency", round_context(session, round_id),
                      ",".join(sorted(u3)).encode()])


# why a holder has no share of a peer, when the peer itself is provably at fault: a ciphertext under its
# own signature that does not decrypt, or a key it signed that no share can be agreed with
SENDER_FAULTS = frozenset({"bad_share", "bad_key", "key_agreement_failed"})


def share_message(context: bytes, sender: str, recipient: str, ciphertext: bytes) -> bytes:
    """What a device signs for each encrypted share it sends: the ciphertext, bound to the pair and round.
    A ciphertext under a valid signature that does not decrypt was sent that way by its signer (the
    relay cannot forge one): its recipient may then reveal what it masked with the signer."""
    return b"|".join([b"fk-secagg-v1", b"share-ct", context, sender.encode(), recipient.encode(),
                      hashlib.sha256(ciphertext).digest()])


def commitment(session: str, round_id: int, device_id: str, b_seed: bytes) -> str:
    """SHA-256 commitment to a self-mask seed, checked after reconstruction (catches bad shares)."""
    return hashlib.sha256(b"|".join([b"fk-secagg-v1", b"b-commit", round_context(session, round_id),
                                     device_id.encode(), b_seed])).hexdigest()


# =========================================================================== encrypted shares


def _share_aad(context: bytes, sender: str, recipient: str) -> bytes:
    return b"|".join([b"fk-secagg-v1", b"share", context, sender.encode(), recipient.encode()])


def encrypt_shares(key: bytes, context: bytes, sender: str, recipient: str, s_share: int, b_share: int) -> bytes:
    """nonce (12) || AES-256-GCM(sender | recipient | share of s_sk | share of b), AAD binds the pair and round."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    plain = b"|".join([sender.encode(), recipient.encode()]) + b"#" + share_to_bytes(s_share) + share_to_bytes(b_share)
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, _share_aad(context, sender, recipient))


def decrypt_shares(key: bytes, context: bytes, sender: str, recipient: str, blob: bytes) -> tuple[int, int]:
    """(share of s_sk, share of b); SecAggMathError if the ciphertext was altered or is for someone else."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(blob) < 12 + 16:
        raise SecAggMathError("encrypted share too short")
    try:
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], _share_aad(context, sender, recipient))
    except Exception:
        raise SecAggMathError(f"encrypted share from {sender} failed authentication (tampered in transit?)") from None
    head, _, rest = plain.partition(b"#")
    if head != b"|".join([sender.encode(), recipient.encode()]) or len(rest) != 2 * SHARE_BYTES:
        raise SecAggMathError(f"share from {sender} is addressed to someone else")
    return share_from_bytes(rest[:SHARE_BYTES]), share_from_bytes(rest[SHARE_BYTES:])


# =========================================================================== neighbour graph


def neighbours(ids: Sequence[str], k: int, seed: bytes | str) -> dict[str, list[str]]:
    """Who masks with whom. k <= 0 or k >= n - 1: everyone with everyone (SecAgg). Otherwise a Harary
    graph H(k, n) (k rounded up to even: each device linked to the k/2 nearest on each side of a
    ring) on a seeded random order of the devices (SecAgg+). Symmetric; nobody is its own neighbour."""
    ids = sorted(set(ids))
    n = len(ids)
    if k <= 0 or k >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    seed_b = seed.encode() if isinstance(seed, str) else seed
    order = sorted(ids, key=lambda u: hashlib.sha256(seed_b + b"|" + u.encode()).digest())
    half = (k + 1) // 2
    out: dict[str, set[str]] = {u: set() for u in ids}
    for i, u in enumerate(order):
        for j in range(1, half + 1):
            v = order[(i + j) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: sorted(vs) for u, vs in out.items()}


def threshold_for(holders: int, fraction: float) -> int:
    """Shares needed to reconstruct among `holders` (a device and its neighbours): at least a strict
    majority (so two disjoint groups can never both reconstruct) and at least ceil(fraction * holders)."""
    return max(holders // 2 + 1, math.ceil(fraction * holders - 1e-9))


def unmask_probability(k: int, keep: float, threshold: int, survivors: int) -> float:
    """Chance that a SecAgg+ round can unmask: every one of `survivors` devices keeps at least
    `threshold` of its k + 1 share holders (itself and its k neighbours), when each neighbour is still
    there at unmasking independently with probability `keep`. A device below it makes the round fail."""
    if not 0.0 <= keep <= 1.0 or k < 0 or survivors < 0:
        raise SecAggMathError("need k >= 0, survivors >= 0 and keep in [0, 1]")
    need = max(0, threshold - 1)  # the device's own share is always there
    per_device = sum(math.comb(k, j) * keep ** j * (1.0 - keep) ** (k - j) for j in range(need, k + 1))
    return min(1.0, per_device) ** survivors


def pair_sign(u: str, v: str) -> int:
    """+1 if u adds the pairwise mask with v, -1 if it subtracts it (u < v adds)."""
    if u == v:
        raise SecAggMathError("no pairwise mask with oneself")
    return 1 if u < v else -1


# =========================================================================== PRG


class PRG:
    """AES-256-CTR keystream as ring words, into reusable buffers (not thread-safe; one per thread)."""

    def __init__(self, dim: int, bits: int) -> None:
        if bits not in BITS:
            raise SecAggMathError(f"bits must be one of {BITS}")
        self.dim, self.bits = int(dim), int(bits)
        self.dtype = _RING_DTYPES[bits]
        nbytes = self.dim * self.dtype.itemsize
        self._zeros = bytes(nbytes)
        self._out = bytearray(nbytes + 16)  # update_into needs len(data) + block_size - 1
        self._view = np.frombuffer(self._out, dtype=self.dtype, count=self.dim)

    def expand(self, seed: bytes) -> np.ndarray:
        """The keystream of `seed` as dim ring words; the view is valid until the next call."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        if len(seed) != KEY_BYTES:
            raise SecAggMathError("PRG seeds are 32 bytes")
        enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
        enc.update_into(self._zeros, self._out)
        return self._view

    def add(self, acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
        """acc += sign * PRG(seed)  (mod 2^bits, in place)."""
        words = self.expand(seed)
        if sign >= 0:
            np.add(acc, words, out=acc)
        else:
            np.subtract(acc, words, out=acc)


_prg_local = threading.local()


def prg_for(dim: int, bits: int) -> PRG:
    """A per-thread PRG with buffers for this size (reused across calls)."""
    cur = getattr(_prg_local, "prg", None)
    if cur is None or cur.dim != dim or cur.bits != bits:
        cur = _prg_local.prg = PRG(dim, bits)
    return cur


# =========================================================================== quantization


@dataclasses.dataclass(frozen=True)
class Quantization:
    bits: int  # ring Z_{2^bits}
    scale: float  # integer = round(value * scale)
    bound: float  # every coordinate is clamped to [-bound, bound] before scaling
    qmax: int  # floor(bound * scale) >= |any device integer|
    n_max: int  # most devices whose sum never wraps
    headroom_bits: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Quantization":
        q = cls(bits=int(data["bits"]), scale=float(data["scale"]), bound=float(data["bound"]),
                qmax=int(data["qmax"]), n_max=int(data["n_max"]), headroom_bits=int(data["headroom_bits"]))
        q.check()
        return q

    def check(self) -> None:
        if self.bits not in BITS:
            raise SecAggMathError(f"bits must be one of {BITS}")
        if not (self.scale > 0 and self.bound > 0 and math.isfinite(self.scale) and math.isfinite(self.bound)):
            raise SecAggMathError("scale and bound must be positive")
        if self.qmax < 1 or self.n_max < 1 or self.n_max * self.qmax > (1 << (self.bits - 1)) - 1:
            raise SecAggMathError("n_max * qmax must fit in the signed ring range")

    @property
    def limit(self) -> int:
        return self.n_max * self.qmax


def coordinate_bound(clip: float, noise_stddev: float, dim: int, sigmas: float = 6.0) -> float:
    """Bound on every coordinate of a clipped + noised delta (see the module doc)."""
    if clip <= 0:
        raise SecAggMathError("secure aggregation needs clip_norm > 0 (a bounded update)")
    return float(clip + noise_stddev * (math.sqrt(2.0 * math.log(2.0 * max(dim, 1))) + sigmas))


def choose_quantization(clip: float, noise_stddev: float, dim: int, n_max: int, bits: int = 32,
                        headroom_bits: int = 8, sigmas: float = 6.0) -> Quantization:
    if bits not in BITS:
        raise SecAggMathError(f"bits must be one of {BITS}")
    bound = coordinate_bound(clip, noise_stddev, dim, sigmas)
    limit = ((1 << (bits - 1)) - 1) >> headroom_bits
    qmax = limit // max(1, n_max)
    if qmax < 16:
        raise SecAggMathError(f"{bits}-bit ring too small for {n_max} devices with {headroom_bits} headroom bits")
    q = Quantization(bits=bits, scale=qmax / bound, bound=bound, qmax=int(qmax), n_max=int(n_max),
                     headroom_bits=int(headroom_bits))
    q.check()
    return q


def quantize(flat: np.ndarray, q: Quantization, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clamp to [-bound, bound], scale, stochastic rounding (deterministic round-half-even if rng is None);
    int64 values in [-qmax, qmax]."""
    x = np.array(flat, dtype=np.float64).reshape(-1)  # one working copy, then in place
    np.clip(x, -q.bound, q.bound, out=x)
    x *= q.scale
    if rng is None:
        out = np.rint(x, out=x)
    else:
        out = np.floor(x)
        x -= out  # the fractional part: round up with that probability
        out += rng.random(x.size) < x
    np.clip(out, -q.qmax, q.qmax, out=out)
    return out.astype(np.int64)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers -> Z_{2^bits} words (two's complement)."""
    return np.asarray(values, dtype=np.int64).astype(_RING_DTYPES[bits])


def lift(ring: np.ndarray, bits: int) -> np.ndarray:
    """Z_{2^bits} -> the signed representative in [-2^(bits-1), 2^(bits-1)) as int64."""
    return np.asarray(ring, dtype=_RING_DTYPES[bits]).view(_SIGNED_DTYPES[bits]).astype(np.int64)


def check_range(lifted: np.ndarray, n: int, q: Quantization) -> tuple[bool, int]:
    """(every |coordinate| <= n * qmax, the largest |coordinate|). A sum with a mask left in fails."""
    peak = int(np.max(np.abs(lifted))) if lifted.size else 0
    return peak <= n * q.qmax, peak


def dequantize(int_sum: np.ndarray, q: Quantization) -> np.ndarray:
    return np.asarray(int_sum, dtype=np.float64) / q.scale


def ring_dtype(bits: int) -> np.dtype:
    return _RING_DTYPES[bits]


# =========================================================================== masking


def mask(q_ring: np.ndarray, bits: int, me: str, b_seed: bytes, s_sk: bytes, peer_s_pks: Mapping[str, bytes],
         context: bytes, prg: PRG | None = None) -> np.ndarray:
    """y = q + PRG(b) + sum_v sign(me, v) PRG(KA(s_sk, s_pk_v))  (mod 2^bits); a new array."""
    prg = prg or prg_for(q_ring.size, bits)
    y = np.array(q_ring, dtype=_RING_DTYPES[bits], copy=True)
    prg.add(y, b_seed, +1)
    for v, pk in peer_s_pks.items():
        prg.add(y, mask_seed(s_sk, pk, context), pair_sign(me, v))
    return y


def mask_seed(s_sk: bytes, peer_s_pk: bytes, context: bytes) -> bytes:
    return agreed_key(s_sk, peer_s_pk, b"mask", context)


def share_key(c_sk: bytes, peer_c_pk: bytes, context: bytes) -> bytes:
    return agreed_key(c_sk, peer_c_pk, b"share", context)


def unmask(total: np.ndarray, bits: int, survivors: Iterable[str], self_seeds: Mapping[str, bytes],
           dropped_sks: Mapping[str, bytes], s_pks: Mapping[str, bytes], graph: Mapping[str, Sequence[str]],
           context: bytes, prg: PRG | None = None,
           dropped_pair_seeds: Mapping[str, Mapping[str, bytes]] | None = None) -> np.ndarray:
    """Remove every mask from the modular sum of the survivors' masked vectors (in place; returned).

    survivors: U3. self_seeds: b_u for u in U3. dropped_sks: s_sk_v for v in U2 \\ U3 (they shared keys
    and may appear in survivors' pairwise masks). graph: neighbours of each device of U1.
    dropped_pair_seeds: for a dropped v whose s_sk could not be reconstructed (it sent bad shares),
    {u: s_uv} revealed by each surviving neighbour u itself (see protocol.recover_sum)."""
    prg = prg or prg_for(total.size, bits)
    survivors = set(survivors)
    for u in sorted(survivors):
        prg.add(total, self_seeds[u], -1)
    for v, sk in sorted(dropped_sks.items()):
        for u in graph.get(v, ()):
            if u in survivors:
                # u added sign(u, v) * PRG(s_uv); take it out.
                prg.add(total, mask_seed(sk, s_pks[u], context), -pair_sign(u, v))
    for v, seeds in sorted((dropped_pair_seeds or {}).items()):
        for u, seed in sorted(seeds.items()):
            if u in survivors:
                prg.add(total, seed, -pair_sign(u, v))
    return total


# =========================================================================== masked-vector upload frame


def encode_masked(y: np.ndarray, *, round_id: int, session: str, device_id: str, bits: int,
                  metadata: Mapping[str, Any] | None = None) -> bytes:
    y = np.ascontiguousarray(y, dtype=_RING_DTYPES[bits])
    header = {"kind": "secagg_masked_input", "protocol": PROTOCOL, "protocol_version": PROTOCOL_VERSION,
              "round_id": int(round_id), "session": session, "device_id": device_id, "bits": int(bits),
              "dim": int(y.size), "metadata": dict(metadata or {})}
    return privacy_wire.frame(MASKED_MAGIC, header, memoryview(y).cast("B"))


def decode_masked(data: bytes, *, bits: int, dim: int, max_bytes: int | None = None
                  ) -> tuple[dict[str, Any], np.ndarray, str]:
    """(header, ring vector (read-only view), sha256 hex); privacy_wire.FrameError on any mismatch."""
    header, payload, sha = privacy_wire.unframe(MASKED_MAGIC, data, max_bytes)
    if header.get("kind") != "secagg_masked_input" or header.get("protocol_version") != PROTOCOL_VERSION:
        raise privacy_wire.FrameError("wrong_kind", "not a secure-aggregation masked input")
    if header.get("bits") != bits or header.get("dim") != dim:
        raise privacy_wire.FrameError("shape_mismatch", f"expected {dim} words of {bits} bits, header says "
                                                        f"{header.get('dim')} of {header.get('bits')}")
    if len(payload) != dim * _RING_DTYPES[bits].itemsize:
        raise privacy_wire.FrameError("shape_mismatch", f"payload is {len(payload)} bytes, expected "
                                                        f"{dim * _RING_DTYPES[bits].itemsize}")
    return header, np.frombuffer(payload, dtype=_RING_DTYPES[bits]), sha


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def unb64(text: str, length: int | None = None) -> bytes:
    import base64
    import binascii

    try:
        out = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError) as exc:
        raise SecAggMathError(f"bad base64: {exc}") from None
    if length is not None and len(out) != length:
        raise SecAggMathError(f"expected {length} bytes, got {len(out)}")
    return out


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


__all__ = [
    "PROTOCOL", "PROTOCOL_VERSION", "PRIME", "BITS", "SecAggMathError",
    "shamir_split", "shamir_reconstruct", "shamir_reconstruct_checked", "lagrange_at", "lagrange_at_zero",
    "secret_to_int", "int_to_secret",
    "share_to_bytes", "share_from_bytes",
    "x25519_keypair", "x25519_public", "x25519_key_problem", "X25519_LOW_ORDER", "X25519_P", "agreed_key",
    "round_context", "ed25519_keypair", "ed25519_public",
    "sign", "verify", "advertise_message", "consistency_message", "commitment",
    "encrypt_shares", "decrypt_shares", "share_message", "SENDER_FAULTS", "neighbours", "threshold_for", "pair_sign",
    "PRG", "prg_for", "Quantization", "coordinate_bound", "choose_quantization", "quantize", "to_ring", "lift",
    "check_range", "dequantize", "ring_dtype", "mask", "mask_seed", "share_key", "unmask",
    "encode_masked", "decode_masked", "b64", "unb64",
]
