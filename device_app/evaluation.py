"""Evaluation tasks: score the round's candidate and baseline models on the device's held-back text
and report the numbers (recall, loss; never text)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np

from device_app.http_client import ServerError
from device_app.model_state import ModelState
from device_app.model_sync import ModelSync
from device_app.outcome import Outcome
from device_app.store import TextStore
from device_app.uploads import UploadContext
from models import wire


def run_eval_task(task: Any, should_drop: Callable[[], bool] | None, *, ctx: UploadContext, sync: ModelSync,
                  models: ModelState, store: TextStore) -> Outcome:
    """Download each model of the task, evaluate it, report; Offline propagates."""
    from device_app.local_training import examples_for, trainer_for  # TensorFlow only when evaluating

    rid = task.round_id
    if sync.server_version() is None:
        sync.sync()
    sync.sync_identity_for(task)
    if not models.has_model:
        return Outcome("no_model", "no global model", rid)
    config, vocab = models.config, models.vocab
    assert config is not None and vocab is not None
    x, y = examples_for(store.split().heldout, vocab, config.seq_len)
    if int(np.count_nonzero(y)) == 0:
        return Outcome("no_data", "no held-back text to evaluate on", rid)
    versions = [v for v in (task.candidate_version, task.baseline_version) if v is not None]
    trainer = trainer_for(config)
    results = []
    for i, version in enumerate(versions):
        if should_drop is not None and should_drop():
            return Outcome("cancelled", "dropped out during evaluation", rid)
        ctx.progress.report(0.1 + 0.4 * i, f"evaluating model {version}")
        url = task.model_urls.get(str(version))
        download = ctx.link.call(lambda api: api.download_model(version=version, url=url))
        assert download.data is not None
        payload = wire.decode(download.data, config, expected_kind="weights")
        m = trainer.evaluate(list(payload.tensors), x, y)
        results.append({
            "model_version": int(version),
            "num_examples": int(m["tokens"]),
            "recall": float(m["top1_recall"]),
            "loss": float(m["loss"]),
            "metrics": {"top3_recall": float(m["top3_recall"])},
        })
    body_hash = hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()
    entry = {"type": "eval_report", "round_id": rid, "url": task.report_url, "sha256": body_hash, "results": results}
    try:
        ctx.link.call(lambda api: api.report_eval(rid, results, url=task.report_url))
    except ServerError as exc:
        ctx.sent_log.append({**entry, "status": "rejected", "error": exc.reason})
        return Outcome("rejected", f"{exc.reason}: {exc.detail}", rid)
    ctx.sent_log.append({**entry, "status": "accepted"})
    ctx.state.count("evaluations")
    return Outcome("reported", f"evaluated models {versions}", rid, info={"results": results})
