"""The embedded default model: the small CIFG pre-trained centrally on the donors' text only.

    .venv/bin/python -m models.pretrained            # train (or resume) and write models/pretrained/small

The bundle in `models/pretrained/small/` is what the server, the demo and the keyboard start from
when no other model is given: no download and no pre-training wait. It is trained by
`models.baselines --preset small --population donors` (early stopping on a validation split of
the donors' sentences; its checkpoint folder `--work` resumes), so it holds only text the privacy
design allows to be used centrally: the donors' (docs/donors.md), never the federated users' nor
the held-out users'. Its meta.json records the command, the data (dataset, population, the donor
split's counts and the hash of the donor id list) and the measured quality on the held-out users:
the model's top-1/top-3/perplexity next to the KN 5-gram and the unigram built from the same
donors' text, so a demo that starts here can say what its federated rounds added.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "pretrained" / "small"
DEFAULT_WORK = "artifacts/baselines-donors"
COMMAND = ".venv/bin/python -m models.pretrained"


def default_bundle_path() -> Path:
    """Where the committed default model lives (a models.bundle directory)."""
    return DEFAULT_BUNDLE


def quality_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Held-out (unseen users) metrics of every baseline row, by model name."""
    return {row["model"]: {k: row[k] for k in ("top1_recall", "top3_recall", "perplexity", "tokens") if k in row}
            for row in results["rows"] if row["split"] == "heldout"}


def build(work: str | Path = DEFAULT_WORK, dest: str | Path = DEFAULT_BUNDLE, preset_name: str = "small",
          dataset: str = "chitchat", verbose: bool = True) -> Path:
    """Train (resuming in `work`) on the donors and write the bundle with its provenance into `dest`."""
    from models.baselines import run_baselines
    from models.bundle import load_bundle, save_bundle

    results = run_baselines(dataset=dataset, out=work, preset_name=preset_name, population="donors",
                            tensorboard=False, verbose=verbose)
    trained = load_bundle(Path(work) / "server_trained")
    history = results["server_trained"]
    meta = {
        "source": "models.pretrained",
        "command": COMMAND,
        "data": {"dataset": dataset, "population": "donors", "vocab_source": results["config"].get("vocab_source"),
                 "donor_split": results["data"].get("donor_split"),
                 "train_sentences": results["data"]["train_sentences"],
                 "note": "trained on the donors' text only; federated and held-out users' text never used"},
        "training": {k: history.get(k) for k in ("epochs", "best_epoch", "stopped", "optimizer", "lr", "batch_size",
                                                 "train_seconds", "validation_sentences")},
        "quality_heldout": quality_summary(results),
        "created_from": str(work),
    }
    out = save_bundle(dest, trained.config, trained.vocab, trained.weights, model_version=0, meta=meta)
    # beside the bundle, not in it: a bundle folder holds exactly its four files (models.bundle)
    shutil.copyfile(Path(work) / "report.md", Path(out).parent / f"{Path(out).name}-report.md")
    if verbose:
        q = meta["quality_heldout"]
        print(f"wrote {out}: held-out top-1 {q['server-trained']['top1_recall']:.2%} "
              f"(KN 5-gram on the same donors' text {q['ngram-5']['top1_recall']:.2%})")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=DEFAULT_WORK, help="the baselines' run folder (its checkpoint resumes)")
    ap.add_argument("--dest", default=str(DEFAULT_BUNDLE), help="where the bundle is written")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args(argv)
    from models import interrupts

    interrupts.install()
    try:
        build(args.work, args.dest, args.preset)
    except BaseException as exc:
        print(f"\ninterrupted ({exc}); the same command resumes from {args.work}/checkpoint", file=sys.stderr)
        return interrupts.stop_code(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
