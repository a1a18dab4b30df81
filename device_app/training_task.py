"""Training tasks end to end on the device: pick the upload the round asks for, make sure the round's
base model is here, train on the user's text (device_app/client_update.py), send the update
(device_app/uploads.py). Offline and server errors propagate: the client turns them into outcomes."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from device_app.model_state import ModelState
from device_app.model_sync import ModelSync
from device_app.outcome import Outcome
from device_app.secagg import SecureAggregation
from device_app.store import TextStore
from device_app.uploads import UploadContext, upload_for


def run_train_task(task: Any, *, should_drop: Callable[[], bool] | None, should_stop: Callable[[], bool],
                   ctx: UploadContext, sync: ModelSync, models: ModelState, store: TextStore,
                   hooks: Sequence[SecureAggregation], upload_dtype: str, rng: np.random.Generator) -> Outcome:
    """should_drop: the fleet's dropout, checked once more before sending; should_stop: stops training."""
    from device_app.client_update import TrainingCancelled, local_examples, train_round  # TensorFlow only now

    rid = task.round_id
    upload = upload_for(task, hooks, ctx, upload_dtype)
    if upload is None:
        return Outcome("secagg_unsupported", "the round asks for secure aggregation this device cannot do", rid)
    if sync.server_version() is None:
        sync.sync()  # the bundled initial model is not the round's base: get the server's
    sync.sync_identity_for(task)
    if not models.has_model or task.base_version is None:
        return Outcome("no_model", "no global model", rid)
    config, vocab = models.config, models.vocab
    assert config is not None and vocab is not None
    examples = local_examples(store.training_messages(), vocab, config.seq_len, task.max_examples, rng)
    if len(examples[0]) == 0:
        return Outcome("no_data", "no local text to train on yet", rid)
    ctx.progress.report(0.05, f"round {rid}: getting model {task.base_version}")
    base = sync.weights_for(task.base_version, task.model_url)
    refused = upload.begin(task)  # SecAgg: keys are exchanged before training
    if refused is not None:
        return refused
    try:
        output = train_round(task, examples, base, config, rng=rng, should_stop=should_stop,
                             progress=lambda f, msg: ctx.progress.report(0.1 + 0.8 * f, f"round {rid}: {msg}"))
    except TrainingCancelled as exc:
        upload.abort(task)
        return Outcome("cancelled", str(exc), rid)
    # Reported once the update exists (privatizing takes milliseconds): the UI sees the same steps.
    ctx.progress.report(0.92, f"round {rid}: clipping and noising the update")
    if should_drop is not None and should_drop():
        upload.abort(task)
        return Outcome("cancelled", "dropped out before uploading", rid)
    return upload.send(task, output)
