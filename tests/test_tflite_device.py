"""The keyboard on the TFLite path (issue #16 items 3 and 4): suggestions, the personal cache's blend,
new global and personal weights and local training, all with TensorFlow blocked, equal to the Keras
path; templates built once with TensorFlow and cached; the backend shown in the status; and
buildozer.spec's requirements, exactly what the TFLite keyboard imports."""
from __future__ import annotations

import configparser
import json
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_app.local_training import TRAIN_BACKEND_ENV, examples_for, trainer_for, training_backend
from device_app.model_state import SUGGEST_BACKEND_ENV, ModelState
from device_app.testing import SAMPLE_MESSAGES
from device_app.ui.screens import describe_backends
from models.bundle import load_bundle, save_bundle
from models.config import preset
from models.pretrained import default_bundle_path
from models.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("", "see you to", "how are ", "i will bring the ", "the tortoise ", "Thanks for the pine")

# Prepended to every subprocess script: any import of TensorFlow or Keras fails, as on a phone.
BLOCK_TF = '''
import sys
class _BlockTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(name + " is blocked")
        return None
sys.meta_path.insert(0, _BlockTensorFlow())
'''
NO_TF_LOADED = '''
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("tensorflow", "keras"))
assert not loaded, loaded
'''

# Runs in both processes: the keyboard's suggestion path on the committed bundle, a new global
# version, a served personal model, and local training. `out` collects what is compared.
SCENARIO = '''
import numpy as np
from device_app.local_training import examples_for, trainer_for
from device_app.model_state import ModelState
from models.bundle import load_bundle

def scenario(model_dir, bundle_dir, messages, prefixes):
    out = {}
    state = ModelState(model_dir, initial_bundle=bundle_dir, messages=lambda: list(messages))
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(0)
    def record(tag):
        suggester = state.suggester()
        out[tag + "/suggest"] = [state.suggest(p) for p in prefixes]
        out[tag + "/logprobs"] = np.stack([suggester.next_word_logprobs(suggester.context_ids(p)) for p in prefixes])
    record("initial")
    newer = [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in bundle.weights]
    state.install_global(bundle.config, bundle.vocab, newer, 2, {"source": "test"})
    record("global_v2")
    personal = [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in newer]
    state.install_personal(personal, {"base_version": 2, "selection": {"served": "personal", "weight": 0.3,
                                                                       "weight_global": 0.1}})
    record("personal")
    out["backends"] = state.status()["backends"]
    out["cache_weight"] = state.cache_weight
    x, y = examples_for(messages, bundle.vocab, bundle.config.seq_len)
    trainer = trainer_for(bundle.config)
    result = trainer.train(bundle.weights, x, y, epochs=1, batch_size=8, lr=0.5, seed=0)
    out["train/weights"] = result.weights
    out["train/loss"] = result.loss_first_epoch
    out["train/eval"] = trainer.evaluate(result.weights, x, y)
    out["train/logprobs"] = trainer.logprobs(bundle.weights, x[:3])  # what personalization scores with
    out["train/backend"] = trainer.backend
    return out
'''


def run_blocked(script: str, timeout: float = 240) -> str:
    """Run `script` in a fresh interpreter with TensorFlow blocked; fail with its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in (SUGGEST_BACKEND_ENV, TRAIN_BACKEND_ENV)}  # auto
    done = subprocess.run([sys.executable, "-c", BLOCK_TF + script + NO_TF_LOADED], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def keras_scenario(tmp: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv(SUGGEST_BACKEND_ENV, "keras")
    monkeypatch.setenv(TRAIN_BACKEND_ENV, "keras")
    namespace: dict = {}
    exec(SCENARIO, namespace)  # noqa: S102 - the same code the subprocess runs
    return namespace["scenario"](tmp, bundle, list(SAMPLE_MESSAGES), PREFIXES)


def test_keyboard_runs_on_tflite_without_tensorflow_as_on_keras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = default_bundle_path()
    script = SCENARIO + f'''
import pickle
out = scenario({str(tmp_path / "tflite")!r}, {str(bundle)!r}, {list(SAMPLE_MESSAGES)!r}, {PREFIXES!r})
pickle.dump(out, open({str(tmp_path / "tflite.pkl")!r}, "wb"))
'''
    run_blocked(script)
    got = pickle.loads((tmp_path / "tflite.pkl").read_bytes())
    want = keras_scenario(tmp_path / "keras", bundle, monkeypatch)
    assert got["backends"] == {"suggestions": "tflite", "training": "tflite"}
    assert want["backends"] == {"suggestions": "keras", "training": "keras"}
    assert got["cache_weight"] == want["cache_weight"] == 0.3  # the personal cache is blended in
    for tag in ("initial", "global_v2", "personal"):
        assert got[f"{tag}/suggest"] == want[f"{tag}/suggest"], tag
        np.testing.assert_allclose(got[f"{tag}/logprobs"], want[f"{tag}/logprobs"], atol=1e-5, rtol=0, err_msg=tag)
    assert got["initial/suggest"] != got["personal/suggest"]  # new weights did reach the interpreter
    # Local training: the TFLite `train` signature (batch padded from 8 to 16) against Keras SGD.
    assert (got["train/backend"], want["train/backend"]) == ("tflite", "keras")
    assert abs(got["train/loss"] - want["train/loss"]) < 1e-4
    for g, w in zip(got["train/weights"], want["train/weights"]):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
    assert abs(got["train/eval"]["loss"] - want["train/eval"]["loss"]) < 1e-4
    assert got["train/eval"]["top1_recall"] == want["train/eval"]["top1_recall"]
    np.testing.assert_allclose(got["train/logprobs"], want["train/logprobs"], atol=1e-5, rtol=0)


def tiny_bundle(path: Path) -> Path:
    vocab = Vocabulary([f"w{i}" for i in range(preset("tiny").vocab_size - 4)])
    config = preset("tiny", vocab_size=len(vocab))
    rng = np.random.default_rng(3)
    weights = [rng.normal(0, 0.3, shape).astype(np.float32) for _, shape in config.weight_specs()]
    return save_bundle(path, config, vocab, weights, 1, {"source": "tests/test_tflite_device.py"})


def test_a_config_without_shipped_templates_builds_them_once_then_runs_without_tensorflow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUGGEST_BACKEND_ENV, raising=False)
    bundle = tiny_bundle(tmp_path / "bundle")
    state = ModelState(tmp_path / "model", initial_bundle=bundle)
    assert state.status()["backends"]["suggestions"] == "tflite"  # TensorFlow here can build the template
    first = [state.suggest(p) for p in ("", "w1 w2 ", "w3 w")]
    cached = tmp_path / "model" / "tflite" / state.config.config_hash()[:16]
    assert sorted(p.name for p in cached.iterdir()) == ["infer_template.tflite", "tflite_sidecar.json",
                                                        "train_template.tflite"]
    script = f'''
from device_app.local_training import trainer_for
from device_app.model_state import ModelState
state = ModelState({str(tmp_path / "model")!r}, initial_bundle=False)
print(__import__("json").dumps([state.suggest(p) for p in ("", "w1 w2 ", "w3 w")]))
assert state.status()["backends"] == {{"suggestions": "tflite", "training": "tflite"}}, state.status()["backends"]
assert trainer_for(state.config).backend == "tflite"
'''
    assert json.loads(run_blocked(script).strip().splitlines()[-1]) == first



def test_a_damaged_or_foreign_template_directory_counts_as_absent(tmp_path: Path) -> None:
    from models.tflite_templates import load_templates

    config = load_bundle(default_bundle_path()).config
    good = default_bundle_path().parent / "small-tflite"
    assert load_templates(good, config) is not None
    assert load_templates(good, preset("tiny")) is None  # another config's
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tflite_sidecar.json").write_bytes((good / "tflite_sidecar.json").read_bytes())
    (bad / "infer_template.tflite").write_bytes(b"\0" * 100)  # wrong size for its sidecar
    assert load_templates(bad, config) is None
    (bad / "tflite_sidecar.json").write_text("{not json")
    assert load_templates(bad, config) is None

def test_backends_are_chosen_at_run_time_and_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUGGEST_BACKEND_ENV, raising=False)
    monkeypatch.delenv(TRAIN_BACKEND_ENV, raising=False)
    config = load_bundle(default_bundle_path()).config
    assert training_backend(config) == "keras"  # TensorFlow installed: Keras trains (faster here)
    monkeypatch.setenv(TRAIN_BACKEND_ENV, "tflite")
    assert training_backend(config) == "tflite" and trainer_for(config).backend == "tflite"
    monkeypatch.setenv(TRAIN_BACKEND_ENV, "gpu")
    with pytest.raises(ValueError):
        training_backend(config)
    monkeypatch.setenv(TRAIN_BACKEND_ENV, "auto")
    monkeypatch.setenv(SUGGEST_BACKEND_ENV, "tflite")
    state = ModelState(tmp_path / "model", initial_bundle=default_bundle_path())
    assert state.status()["backends"] == {"suggestions": "tflite", "training": "keras"}
    assert describe_backends(state.status()["backends"]) == "suggest tflite, train keras"
    assert describe_backends(None) == "-"
    # A TF-free trainer refuses a batch its fixed-batch model cannot take in one step.
    x, y = examples_for(SAMPLE_MESSAGES, state.vocab, config.seq_len)
    with pytest.raises(ValueError, match="larger than"):
        trainer_for(config, "tflite").train(state.global_weights, x, y, epochs=1, batch_size=32, lr=0.1)


# The keyboard app as a phone runs it: the Kivy app and its status screen, suggestions with the
# typing cache, the background client's check-in (to a closed port: offline), and the first device-side
# step of a SecAgg and of a Paillier round. The HTTP, crypto and Paillier stacks and psutil are imported
# only when first needed (test_the_keyboard_starts_without_its_network_crypto_and_battery_stacks), so
# each is reached here through the device code that needs it, not listed by hand.
IMPORTS_SCRIPT = '''
before = set(sys.modules)
import os
from device_app.client import DeviceClient
from device_app.secagg import PaillierHook, SecAggHook, choose
from device_app.ui.app import _build_app_class, configure_kivy
client = DeviceClient({data!r}, "http://127.0.0.1:{port}")
client.commit("see you tomorrow at the station")
assert client.suggest("see you to")
client.tick()
configure_kivy()
app = _build_app_class()(client, start_worker=False)
app.build()
app.status_screen.update(client.status(), None)
assert client.status()["model"]["backends"] == {{"suggestions": "tflite", "training": "tflite"}}
# A protected round's task: the hook that takes its protocol, the SecAgg identity key it registers
# (cryptography), the Paillier protocol check (models.paillier_pack: phe, gmpy2).
secagg = choose(client.secure_aggregation, {{"protocol": "secagg", "version": 1, "quantization": {{"bits": 32}}}})
assert isinstance(secagg, SecAggHook) and len(secagg.identity.public) == 32
assert isinstance(choose(client.secure_aggregation, {{"protocol": "paillier", "version": 1}}), PaillierHook)
from importlib.metadata import packages_distributions
names = packages_distributions()
imported = {{top for top in (m.split(".")[0] for m in set(sys.modules) - before) if top in names}}
print(__import__("json").dumps(sorted({{d for top in imported for d in names[top]}})))
'''


def spec_requirements() -> set[str]:
    spec = configparser.ConfigParser()
    spec.read(ROOT / "buildozer.spec")
    names = {re.split(r"[=<>]", r.strip())[0] for r in spec["app"]["requirements"].split(",")}
    return {normalize(n) for n in names} - {"python3"}  # the interpreter: a python-for-android recipe


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_buildozer_requirements_are_exactly_what_the_tflite_keyboard_imports(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: the check-in finds no server
    script = IMPORTS_SCRIPT.format(data=str(tmp_path / "device"), port=port)
    imported = {normalize(d) for d in json.loads(run_blocked(script).strip().splitlines()[-1])}
    assert "tflite-runtime" in imported and "kivy" in imported
    assert spec_requirements() == imported
    spec = configparser.ConfigParser()
    spec.read(ROOT / "buildozer.spec")
    # The app's entry point and the committed model with its TFLite templates are packaged.
    exts = set(spec["app"]["source.include_exts"].split(","))
    shipped = [*default_bundle_path().iterdir(), *(default_bundle_path().parent / "small-tflite").iterdir()]
    assert {p.suffix.lstrip(".") for p in shipped} <= exts and (ROOT / "main.py").is_file()


# The keyboard's start (issue #16): a DeviceClient on its data dir with no server, the first suggestion,
# the app's typing screen and its status badge. Nothing there talks to a server, runs a protected round
# or probes the battery, so none of their stacks is imported (the phone's start time and memory).
LAZY_STACKS = ("httpx", "httpcore", "rich", "pygments", "click",  # HTTP: a sync, check-in or upload
               "cryptography", "_cffi_backend", "phe", "gmpy2",  # SecAgg / Paillier rounds
               "psutil")  # the eligibility probe (a check-in, the status screen)
START_SCRIPT = '''
import json
from device_app.client import DeviceClient
client = DeviceClient({data!r})
assert client.suggest("see you to")
assert client.models.status()["backends"]["suggestions"] == "tflite"
suggested = sorted({{m.split(".")[0] for m in sys.modules}})
from device_app.ui.app import _build_app_class, configure_kivy
configure_kivy()
app = _build_app_class()(client, start_worker=False)
app.build()
app.refresh_status()
assert app.typing.badge.text.startswith("no server | "), app.typing.badge.text
print(json.dumps({{"suggested": suggested, "app": sorted({{m.split(".")[0] for m in sys.modules}})}}))
'''


def test_the_keyboard_starts_without_its_network_crypto_and_battery_stacks(tmp_path: Path) -> None:
    loaded = json.loads(run_blocked(START_SCRIPT.format(data=str(tmp_path / "device"))).strip().splitlines()[-1])
    assert "numpy" in loaded["suggested"] and "kivy" in loaded["app"]  # the measurement sees imports
    assert [m for m in LAZY_STACKS if m in loaded["suggested"]] == []
    assert [m for m in LAZY_STACKS if m in loaded["app"]] == []


def test_shipped_templates_are_what_the_exporter_makes_for_the_committed_bundle(tmp_path: Path) -> None:
    """models/pretrained/small-tflite is not stale: re-exported, the same bytes."""
    from models.tflite_export import write_templates

    config = load_bundle(default_bundle_path()).config
    shipped = default_bundle_path().parent / "small-tflite"
    write_templates(config, tmp_path / "fresh", compress=True)
    assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    for path in shipped.iterdir():
        assert path.read_bytes() == (tmp_path / "fresh" / path.name).read_bytes(), path.name
