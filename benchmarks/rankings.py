"""Rankings against pairs: reward models trained on the world's rankings of 4 responses or on its pairs, at an equal
number of annotated prompts and at an equal number of compared pairs, all evaluated on the same 1,000 held-out
preference pairs.

    python sft.py                                   # the backbone every reward model starts from (runs/sft)
    python benchmarks/rankings.py                   # 8 reward.py runs (~12 min on 2 CPU cores), then the table
    python benchmarks/rankings.py --no_run          # only the table, from runs already made

A ranking of K = 4 responses holds K(K-1)/2 = 6 compared pairs for one annotated prompt (one annotator's work,
ranked through Plackett-Luce noise); a pair holds one. Every run is reward.py with its defaults (1.5 epochs of
batches of 64 pairs or rankings) on the first rows of data/world/preference or data/world/ranking.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "data", "world")


@dataclass
class Args:
    sft_model: str = "runs/sft"
    """the SFT model the reward models start from"""
    prompts: list[int] = field(default_factory=lambda: [1000, 2000])
    """annotated prompts of the comparisons (each also with as many pairs as those prompts' rankings hold)"""
    output_dir: str = "runs/rankings"
    """where the runs and their data subsets go"""
    run: bool = True
    """train the reward models (otherwise only read their eval.json)"""


def subset(name: str, n: int, out: str) -> str:
    """A dataset directory with the first n training rows of the world's `name` and its whole test split."""
    os.makedirs(out, exist_ok=True)
    with open(f"{WORLD}/{name}/train.jsonl") as f, open(f"{out}/train.jsonl", "w") as g:
        g.writelines(itertools.islice(f, n))
    shutil.copy(f"{WORLD}/{name}/test.jsonl", f"{out}/test.jsonl")
    return out


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    runs = []  # (label, dataset, training rows, annotated prompts, compared pairs)
    for n in args.prompts:
        runs += [(f"pairs, {n} prompts", "preference", n, n, n), (f"rankings, {n} prompts", "ranking", n, n, 6 * n)]
        runs.append((f"pairs, {6 * n} pairs", "preference", 6 * n, 6 * n, 6 * n))
    runs += [
        ("rankings, all (4,000)", "ranking", 4000, 4000, 24000),
        ("pairs, all (16,000)", "preference", 16000, 16000, 16000),
    ]
    rows = []
    for label, name, n, prompts, pairs in runs:
        out = os.path.join(args.output_dir, f"{name}_{n}")
        if args.run:
            data = subset(name, n, os.path.join(args.output_dir, "data", f"{name}_{n}"))
            shutil.rmtree(out, ignore_errors=True)
            command = (
                f"reward.py --model_name_or_path {args.sft_model} --dataset_name {data} --eval_dataset_name "
                f"{WORLD}/preference --output_dir {out}"
            )
            subprocess.run([sys.executable, *command.split()], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        results = json.load(open(os.path.join(out, "eval.json")))
        rows.append((label, prompts, pairs, results))
    print("| training data | annotated prompts | compared pairs | steps | held-out accuracy | gold agreement |")
    print("|---|---|---|---|---|---|")
    for label, prompts, pairs, r in rows:
        accuracy, agreement = r["rewards/accuracies"], r["gold_agreement"]
        print(f"| {label} | {prompts:,} | {pairs:,} | {r['steps']} | {accuracy:.3f} | {agreement:.3f} |")
