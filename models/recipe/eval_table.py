"""Runs `warm eval` (the product's own code) on the recipe's test pairs for the clean set and
the label-noise set, and `warm inspect` on both, and prints the model card's tables.

    python3 models/recipe/eval_table.py --warm target/release/warm \\
        --clean models/minilm-sentiment-warm --noisy /tmp/warm-demo/noisy --pairs /tmp/warm-demo/pairs
"""
import argparse
import json
import subprocess
from pathlib import Path

PAIR_SETS = [
    ("movie_test", "movie reviews, held out (in-distribution)"),
    ("amazon", "Amazon reviews (other domain)"),
    ("tweets", "tweets (other domain)"),
]


def members(folder: Path):
    return sorted(str(p) for p in folder.iterdir() if p.name.startswith("member-"))


def run_eval(warm, dirs, pairs, cache: Path):
    """`warm eval --json`, kept in cache (one file per set and pair file) so the tables can be
    re-rendered without re-scoring."""
    if cache.exists():
        return json.loads(cache.read_text())
    args = [warm, "eval", "--pairs", str(pairs), "--json"]
    for d in dirs:
        args += ["--model", d]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    cache.write_text(out)
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", default="target/release/warm")
    ap.add_argument("--clean", type=Path, required=True)
    ap.add_argument("--noisy", type=Path)
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/warm-demo/eval"))
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    sets = [("clean labels", args.clean)] + ([("25% of training labels flipped", args.noisy)] if args.noisy else [])
    header = None
    for n, (label, folder) in enumerate(sets):
        dirs = members(folder)
        for key, description in PAIR_SETS:
            report = run_eval(args.warm, dirs, args.pairs / f"{key}.jsonl", args.cache / f"{n}-{key}.json")
            cols = report["members"] + [report["warm"], report["ens"]]
            if header is None:
                header = ["training", "test pairs", "n"] + [Path(c["name"]).name for c in report["members"]] \
                    + ["WARM", "ENS"]
                print("| " + " | ".join(header) + " |")
                print("|" + "---|" * len(header))
            best = max(c["accuracy"] for c in report["members"])
            top = max(x["correct"] for x in cols)
            cells = []
            for c in cols:
                cell = f"{100 * c['accuracy']:.2f}"
                cells.append(f"**{cell}**" if c["correct"] == top else cell)
            print(f"| {label} | {description} | {report['pairs']} | " + " | ".join(cells) + " |")
            print(f"<!-- {label} / {key}: WARM - best member = {100 * (report['warm']['accuracy'] - best):+.1f} points,"
                  f" WARM - ENS = {100 * (report['warm']['accuracy'] - report['ens']['accuracy']):+.1f} -->")
    for label, folder in sets:
        out = subprocess.run([args.warm, "inspect"] + sum((["--model", d] for d in members(folder)), []),
                             capture_output=True, text=True)
        print(f"\n`warm inspect` ({label}):\n\n```\n{out.stdout.strip()}\n```")


if __name__ == "__main__":
    main()
