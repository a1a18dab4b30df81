"""python -m models.data stats --dataset chitchat [--vocab-size 10000] [--seed 0] [--json]
python -m models.data donors --dataset chitchat [--sizes 5000 10000] [--seed 0] [--json]"""
from __future__ import annotations

import argparse
import json
import sys

from models.data import load_dataset
from models.data.stats import dataset_stats, format_stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="clients, words, examples per client, OOV rates, what was dropped")
    stats.add_argument("--dataset", default="chitchat", help="chitchat, shakespeare, a .txt file or a folder of them")
    stats.add_argument("--vocab-size", type=int, default=10_000)
    stats.add_argument("--seed", type=int, default=0, help="chooses the held-out clients")
    stats.add_argument("--json", action="store_true", help="print machine-readable JSON")
    donors = sub.add_parser("donors", help="the donor split (docs/donors.md) and held-out OOV per vocabulary source")
    donors.add_argument("--dataset", default="chitchat", help="chitchat, shakespeare, a .txt file or a folder of them")
    donors.add_argument("--sizes", type=int, nargs="+", default=[5_000, 10_000], help="vocabulary sizes in words")
    donors.add_argument("--seed", type=int, default=0, help="chooses the held-out clients and the donors")
    donors.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)

    kwargs = {"seed": args.seed}
    ds = load_dataset(args.dataset, **kwargs)
    if args.command == "donors":
        from models.data.donors import donor_split_report, format_oov_table, heldout_oov_rates

        split, rows = donor_split_report(ds), heldout_oov_rates(ds, args.sizes)
        if args.json:
            json.dump({"donor_split": split, "heldout_oov": rows}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(format_oov_table(split, rows, args.dataset))
        return 0
    result = dataset_stats(ds, vocab_size=args.vocab_size)
    if args.json:
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(format_stats(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
