"""Device suggestion latency: tokenize + predict + rank, against a bare model call, same run.

    .venv/bin/python benchmarks/bench_device_suggest.py                 # gboard preset, 2,000 keystrokes
    .venv/bin/python benchmarks/bench_device_suggest.py --preset small --keystrokes 500

What is measured, per keystroke of real chitchat messages typed one character at a time:
* bare: NextWordPredictor.next_word_logprobs(context ids) alone: the tf.function model call
  (one trace, fixed signature) on ids computed beforehand. The floor for any suggestion.
* suggest (uncached): DeviceClient's path, ModelState.suggest(text) with the context cache off:
  split the partial word, tokenize the sentence, encode, the same model call, prefix lookup or
  top-k ranking, case matching.
* suggest (uncached, personal cache on): the same, with the served model blended with the personal
  typing cache (device_app/typing_cache.py, models/personal_cache.py) of a user who typed
  `--cache-messages` chitchat messages, at the default weight: n-gram lookups, the cache's
  distribution over the vocabulary and the blend, per keystroke (the same model and state as the
  uncached row, with the "use personal model" switch on).
* suggest (typing): cache-on suggestions with the device's context cache on, as the keyboard runs them:
  keystrokes inside a word reuse the model call of the word's first keystroke.
Each keystroke times bare, then uncached and cache-on in alternating order, so drift hits them alike. Model weights are random
(latency does not depend on them); the vocabulary is the chitchat top-10k, so tokenization and
prefix lookups see real words. Goal: uncached p50 and p99 <= 1.2x bare, with the personal cache on too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from device_app.model_state import ModelState  # noqa: E402
from device_app.testing import vocab_for  # noqa: E402
from models.bundle import save_bundle  # noqa: E402
from models.config import preset  # noqa: E402
from models.data import load_dataset  # noqa: E402
from models.keras_model import build_model, get_weights  # noqa: E402
from models.tokenizer import split_partial  # noqa: E402


def keystrokes(messages: list[str], n: int) -> list[str]:
    out: list[str] = []
    for m in messages:
        for i in range(1, len(m) + 1):
            out.append(m[:i])
            if len(out) >= n:
                return out
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gboard")
    ap.add_argument("--keystrokes", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--cache-messages", type=int, default=2000, help="messages in the personal typing cache")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)

    ds = load_dataset("chitchat")
    size = preset(args.preset).vocab_size - 4
    vocab = vocab_for(ds.all_train_sentences(), size=size)
    config = preset(args.preset, vocab_size=len(vocab))
    tmp = Path(tempfile.mkdtemp(prefix="bench-suggest-"))
    save_bundle(tmp / "bundle", config, vocab, get_weights(build_model(config, seed=0)), 1)
    # A user's typing history (training sentences: not the test sentences typed below).
    history = ds.all_train_sentences()[: args.cache_messages]
    state = ModelState(tmp / "device", initial_bundle=tmp / "bundle", messages=lambda: history)
    state.warm_up()  # traces the predictor and builds the typing cache from the history
    state.set_cache_enabled(False)
    assert state.cache_weight > 0 and state.typing_cache.tokens > 0
    weight = state.cache_weight
    suggester = state.suggester()
    predictor = state._predictor  # the same NextWordPredictor the suggestions use
    texts = keystrokes(ds.all_test_sentences()[:2000], args.keystrokes + args.warmup)
    ids = [suggester.context_ids(split_partial(t)[0]) for t in texts]

    def suggest(cache_on: bool, text: str) -> float:
        state.personal_enabled = cache_on  # the switch: the model alone, or blended with the typing cache
        t0 = perf()
        state.suggest(text, 3)
        return perf() - t0

    bare: list[float] = []
    full: list[float] = []
    cached: list[float] = []
    perf = time.perf_counter
    for i, (text, ctx) in enumerate(zip(texts, ids)):
        t0 = perf()
        predictor.next_word_logprobs(ctx)
        t1 = perf()
        # the same model for all three; which suggest goes first alternates, so neither always runs warmer
        if i % 2:
            off, on = suggest(False, text), suggest(True, text)
        else:
            on, off = suggest(True, text), suggest(False, text)
        if i >= args.warmup:
            bare.append(t1 - t0)
            full.append(off)
            cached.append(on)
    state.personal_enabled = True  # the typing row as the keyboard runs it: cache on
    state.set_cache_enabled(True)
    typing: list[float] = []
    for i, text in enumerate(texts):
        t0 = perf()
        state.suggest(text, 3)
        if i >= args.warmup:
            typing.append(perf() - t0)

    result = {
        "preset": args.preset,
        "parameters": config.num_parameters(),
        "vocab": len(vocab),
        "keystrokes": len(bare),
        "bare_ms": {"p50": pct(bare, 50), "p99": pct(bare, 99)},
        "suggest_uncached_ms": {"p50": pct(full, 50), "p99": pct(full, 99)},
        "suggest_cache_on_ms": {"p50": pct(cached, 50), "p99": pct(cached, 99)},
        "suggest_typing_ms": {"p50": pct(typing, 50), "p99": pct(typing, 99)},
        "ratio_uncached_p50": pct(full, 50) / pct(bare, 50),
        "ratio_uncached_p99": pct(full, 99) / pct(bare, 99),
        "ratio_cache_on_p50": pct(cached, 50) / pct(bare, 50),
        "ratio_cache_on_p99": pct(cached, 99) / pct(bare, 99),
        "cache_messages": len(history),
        "cache_tokens": state.typing_cache.tokens,
        "cache_weight": weight,
        "ratio_typing_p50": pct(typing, 50) / pct(bare, 50),
        "tracing_count": predictor.tracing_count,
        "goal": "ratio_uncached and ratio_cache_on <= 1.2",
    }
    print(f"suggestion latency, {args.preset} preset ({config.num_parameters():,} params, {len(vocab):,} words), "
          f"{len(bare)} keystrokes of chitchat test messages")
    print(f"  bare model call        p50 {result['bare_ms']['p50']:.3f} ms   p99 {result['bare_ms']['p99']:.3f} ms")
    print(f"  suggest (uncached)     p50 {result['suggest_uncached_ms']['p50']:.3f} ms   "
          f"p99 {result['suggest_uncached_ms']['p99']:.3f} ms   ratio p50 {result['ratio_uncached_p50']:.2f}x "
          f"p99 {result['ratio_uncached_p99']:.2f}x (goal <= 1.2x)")
    print(f"  suggest (personal cache on, {len(history)} messages, weight {weight:g}) "
          f"p50 {result['suggest_cache_on_ms']['p50']:.3f} ms   p99 {result['suggest_cache_on_ms']['p99']:.3f} ms   "
          f"ratio p50 {result['ratio_cache_on_p50']:.2f}x p99 {result['ratio_cache_on_p99']:.2f}x (goal <= 1.2x)")
    print(f"  suggest (typing, cached contexts) p50 {result['suggest_typing_ms']['p50']:.3f} ms   "
          f"p99 {result['suggest_typing_ms']['p99']:.3f} ms   ratio p50 {result['ratio_typing_p50']:.2f}x")
    print(f"  predictor traced {predictor.tracing_count} time(s)")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
