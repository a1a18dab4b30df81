"""Model bundles: save/load round trip, atomic replacement, and each cross-check on load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import wire
from models.bundle import BUNDLE_FILES, Bundle, BundleError, load_bundle, save_bundle
from models.config import preset
from models.vocab import Vocabulary

VOCAB = Vocabulary.build([["a", "b"], ["b", "c"]], size=10)
CONFIG = preset("tiny", vocab_size=len(VOCAB))


def weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _, shape in CONFIG.weight_specs()]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_bundle(tmp_path / "model", CONFIG, VOCAB, weights(), model_version=5, meta={"rounds": 12})


def test_round_trip(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == sorted(BUNDLE_FILES)
    bundle = load_bundle(saved)
    assert isinstance(bundle, Bundle)
    assert bundle.config == CONFIG
    assert bundle.vocab == VOCAB
    assert bundle.vocab.tokens == ("<pad>", "<bos>", "<eos>", "<oov>", "b", "a", "c")
    assert bundle.model_version == 5
    assert bundle.meta == {"rounds": 12}
    assert bundle.created.endswith("+00:00")
    assert len(bundle.weights) == 6
    for original, loaded in zip(weights(), bundle.weights):
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, original)


def test_files_have_expected_contents(saved: Path) -> None:
    assert json.loads((saved / "config.json").read_text()) == CONFIG.to_dict()
    assert Vocabulary.load(saved / "vocab.json") == VOCAB
    header = wire.peek_header((saved / "weights.fkw").read_bytes())
    assert (header["kind"], header["dtype"], header["model_version"]) == ("weights", "float32", 5)
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["bundle_format_version"] == 1
    assert meta["config_hash"] == CONFIG.config_hash()
    assert meta["vocab_hash"] == VOCAB.content_hash()
    assert meta["model_version"] == 5
    assert meta["meta"] == {"rounds": 12}


def test_replace_existing_bundle_leaves_no_temp_dirs(saved: Path) -> None:
    save_bundle(saved, CONFIG, VOCAB, weights(seed=1), model_version=6)
    bundle = load_bundle(saved)
    assert bundle.model_version == 6
    assert bundle.meta == {}
    np.testing.assert_array_equal(bundle.weights[0], weights(seed=1)[0])
    assert [p.name for p in saved.parent.iterdir()] == ["model"]


def test_overwrite_false_and_refuse_to_clobber_other_dirs(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        save_bundle(saved, CONFIG, VOCAB, weights(), overwrite=False)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(BundleError) as info:
        save_bundle(other, CONFIG, VOCAB, weights())
    assert info.value.reason == "not_a_bundle"
    assert (other / "cat.jpg").read_bytes() == b"meow"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_bundle(save_bundle(empty, CONFIG, VOCAB, weights())).model_version == 0


def test_failed_save_leaves_previous_bundle_and_no_temp(saved: Path) -> None:
    bad = weights()
    bad[2][0, 0] = np.nan
    with pytest.raises(wire.NonFiniteError):
        save_bundle(saved, CONFIG, VOCAB, bad, model_version=9)
    with pytest.raises(wire.ShapeMismatchError):
        save_bundle(saved, CONFIG, VOCAB, weights()[:5], model_version=9)
    with pytest.raises(ValueError, match="meta"):
        save_bundle(saved, CONFIG, VOCAB, weights(), meta={"x": object()})
    assert load_bundle(saved).model_version == 5
    assert [p.name for p in saved.parent.iterdir()] == ["model"]


def test_save_rejects_vocab_config_size_mismatch(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as info:
        save_bundle(tmp_path / "m", preset("tiny"), VOCAB, weights())
    assert info.value.reason == "vocab_size_mismatch"
    assert "7 tokens" in str(info.value) and "504" in str(info.value)
    assert not (tmp_path / "m").exists()


def test_missing_file(saved: Path) -> None:
    (saved / "vocab.json").unlink()
    with pytest.raises(BundleError, match="missing vocab.json") as info:
        load_bundle(saved)
    assert info.value.reason == "missing_file"


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path / "nope")
    assert info.value.reason == "not_a_bundle"


def test_swapped_vocab_is_vocab_hash_mismatch(saved: Path) -> None:
    Vocabulary.build([["x", "y"], ["y", "z"]], size=10).save(saved / "vocab.json")  # same size, other words
    with pytest.raises(BundleError, match="different vocabulary") as info:
        load_bundle(saved)
    assert info.value.reason == "vocab_hash_mismatch"


def test_edited_config_is_config_hash_mismatch(saved: Path) -> None:
    (saved / "config.json").write_text(CONFIG.__class__(**{**CONFIG.to_dict(), "seq_len": 30}).to_json())
    with pytest.raises(BundleError) as info:
        load_bundle(saved)
    assert info.value.reason == "config_hash_mismatch"


def test_weights_from_other_model_are_bad_weights(saved: Path, tmp_path: Path) -> None:
    other = preset("tiny", vocab_size=len(VOCAB)).__class__(**{**CONFIG.to_dict(), "units": 8})
    other_weights = [np.zeros(shape, np.float32) for _, shape in other.weight_specs()]
    (saved / "weights.fkw").write_bytes(wire.encode(other_weights, other, model_version=5))
    with pytest.raises(BundleError) as info:
        load_bundle(saved)
    assert info.value.reason == "bad_weights"
    assert isinstance(info.value.__cause__, wire.ConfigMismatchError)


def test_damaged_or_delta_weights_are_bad_weights(saved: Path) -> None:
    path = saved / "weights.fkw"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum_mismatch") as info:
        load_bundle(saved)
    assert isinstance(info.value.__cause__, wire.ChecksumMismatchError)
    path.write_bytes(wire.encode(weights(), CONFIG, kind="delta", model_version=5))
    with pytest.raises(BundleError) as info:
        load_bundle(saved)
    assert isinstance(info.value.__cause__, wire.WrongKindError)


def test_model_version_mismatch(saved: Path) -> None:
    (saved / "weights.fkw").write_bytes(wire.encode(weights(), CONFIG, model_version=4))
    with pytest.raises(BundleError, match="model version 4 but meta.json says 5") as info:
        load_bundle(saved)
    assert info.value.reason == "model_version_mismatch"


@pytest.mark.parametrize(
    "file, content, reason",
    [
        ("meta.json", "{broken", "bad_meta"),
        ("meta.json", json.dumps({"bundle_format_version": 2}), "bad_meta"),
        ("meta.json", json.dumps({"bundle_format_version": 1, "model_version": 5}), "bad_meta"),
        ("config.json", "[]", "bad_config"),
        ("config.json", json.dumps({"vocab_size": -1}), "bad_config"),
        ("vocab.json", json.dumps({"format_version": 1, "tokens": ["a"]}), "bad_vocab"),
        ("vocab.json", "not json", "bad_vocab"),
    ],
)
def test_malformed_files(saved: Path, file: str, content: str, reason: str) -> None:
    (saved / file).write_text(content)
    with pytest.raises(BundleError) as info:
        load_bundle(saved)
    assert info.value.reason == reason
    assert file in str(info.value)
