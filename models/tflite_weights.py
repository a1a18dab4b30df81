"""Patch model weights into a TFLite `infer` template without TensorFlow (numpy only).

A template is a float32 .tflite exported once per ModelConfig (models.tflite_export) whose
weight buffers are zeroed. Its sidecar (JSON) says, for each Keras weight in
config.weight_specs() order, where the converter put it: one or more placements, each a
byte offset into the flatbuffer, the buffer's shape, its dtype and a transform
("copy": same element order, possibly reshaped; "transpose": a 2-D weight stored as W.T,
which is how the converter lays out FULLY_CONNECTED kernels). A weight may have several
placements (the tied embedding feeds both GATHER and FULLY_CONNECTED).

Patching only overwrites bytes at fixed offsets, so a patched model can be patched again
(a device updates its model in place each round).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models.config import ModelConfig

SIDECAR_FORMAT = "fkw-tflite-sidecar"
SIDECAR_VERSION = 1
TRANSFORMS = ("copy", "transpose")


class SidecarError(ValueError):
    """A sidecar does not describe this template or these weights."""


def transformed(weight: np.ndarray, transform: str) -> np.ndarray:
    """The weight as the converter stores it (before the reshape to the buffer's shape)."""
    if transform == "copy":
        return weight
    if transform == "transpose":
        if weight.ndim != 2:
            raise SidecarError(f"transpose needs a 2-D weight, got shape {weight.shape}")
        return weight.T
    raise SidecarError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")


def load_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a sidecar JSON file."""
    sidecar = json.loads(Path(path).read_text(encoding="utf-8"))
    check_sidecar(sidecar)
    return sidecar


def check_sidecar(sidecar: Mapping[str, Any]) -> None:
    """Structural checks: format, version, and one entry per config weight, in order."""
    if sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("version") != SIDECAR_VERSION:
        raise SidecarError(f"not a v{SIDECAR_VERSION} {SIDECAR_FORMAT} document")
    config = ModelConfig.from_dict(sidecar["config"])
    want = [(name, list(shape)) for name, shape in config.weight_specs()]
    got = [(w["name"], list(w["shape"])) for w in sidecar["weights"]]
    if got != want:
        raise SidecarError(f"sidecar weights {got} do not match the config's layout {want}")
    for w in sidecar["weights"]:
        if not w["placements"]:
            raise SidecarError(f"weight {w['name']!r} has no placement in the template")
        for p in w["placements"]:
            if p["dtype"] != "float32" or p["transform"] not in TRANSFORMS:
                raise SidecarError(f"weight {w['name']!r}: unsupported placement {p}")
            if int(np.prod(p["shape"])) != int(np.prod(w["shape"])):
                raise SidecarError(f"weight {w['name']!r}: placement shape {p['shape']} has the wrong size")


def sidecar_config(sidecar: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(sidecar["config"])


def write_weights(template: bytes | bytearray, sidecar: Mapping[str, Any], weights: Sequence[Any]) -> bytes:
    """A copy of `template` with `weights` (config.weight_specs() order) written into its buffers."""
    if len(template) != sidecar["template_bytes"]:
        raise SidecarError(f"template is {len(template)} bytes; the sidecar was made for {sidecar['template_bytes']}")
    specs = sidecar["weights"]
    if len(weights) != len(specs):
        raise SidecarError(f"expected {len(specs)} weight tensors, got {len(weights)}")
    out = bytearray(template)
    for spec, weight in zip(specs, weights):
        array = np.asarray(weight, dtype=np.float32)
        if list(array.shape) != list(spec["shape"]):
            raise SidecarError(f"weight {spec['name']!r}: expected shape {spec['shape']}, got {list(array.shape)}")
        for p in spec["placements"]:
            # '<f4': flatbuffers are little-endian whatever the device's byte order.
            data = np.ascontiguousarray(transformed(array, p["transform"]), dtype="<f4").tobytes()
            start = int(p["offset"])
            if start < 0 or start + len(data) > len(out):
                raise SidecarError(f"weight {spec['name']!r}: placement at {start} runs past the template")
            out[start : start + len(data)] = data
    return bytes(out)


def read_weights(model: bytes | bytearray, sidecar: Mapping[str, Any]) -> list[np.ndarray]:
    """The weights a patched model holds (first placement of each), in config.weight_specs() order."""
    weights = []
    for spec in sidecar["weights"]:
        p = spec["placements"][0]
        count = int(np.prod(p["shape"]))
        flat = np.frombuffer(model, dtype="<f4", count=count, offset=int(p["offset"])).astype(np.float32)
        stored_shape = spec["shape"][::-1] if p["transform"] == "transpose" else spec["shape"]
        weights.append(transformed(flat.reshape(stored_shape), p["transform"]).copy())
    return weights


__all__ = ["SIDECAR_FORMAT", "SIDECAR_VERSION", "SidecarError", "load_sidecar", "check_sidecar",
           "sidecar_config", "write_weights", "read_weights", "transformed"]
