"""Rankings against pairs: reward models trained on the world's rankings of 4 responses or on its pairs, at an equal
number of annotated prompts and at an equal number of compared pairs, all evaluated on the same 1,000 held-out
preference pairs.

    python sft.py                                   # the backbone every reward model starts from (runs/sft)
    python benchmarks/rankings.py                   # 13 reward.py runs, then the table
    python benchmarks/rankings.py --no_run          # only the table, from runs already made

A ranking of K = 4 responses holds K(K-1)/2 = 6 compared pairs for one annotated prompt (one annotator's work,
ranked through Plackett-Luce noise); a pair holds one. Every run is reward.py with its defaults (1.5 epochs of
batches of 64 pairs or rankings) on the first rows of data/world/preference or data/world/ranking. At 1.5 epochs
the small sets make few steps (1,000 prompts: 24), so they run again for as many epochs as `min_steps` needs:
whether a difference comes from the data or from too short a training shows in the two rows.
"""

import itertools
import json
import math
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
    min_steps: int = 140
    """the small sets' second run trains for at least this many steps (0: no second run)"""
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
    data_sets = []  # (label, world dataset, training rows, annotated prompts, compared pairs)
    for n in args.prompts:
        data_sets.append((f"pairs, {n} prompts", "preference", n, n, n))
        data_sets.append((f"rankings, {n} prompts", "ranking", n, n, 6 * n))
        data_sets.append((f"pairs, {6 * n} pairs", "preference", 6 * n, 6 * n, 6 * n))
    data_sets += [
        ("rankings, all (4,000)", "ranking", 4000, 4000, 24000),
        ("pairs, all (16,000)", "preference", 16000, 16000, 16000),
    ]
    rows = []
    for label, name, n, prompts, pairs in data_sets:
        steps_per_epoch = math.ceil(n / 64)  # reward.py's batch_size
        for epochs in sorted({1.5, max(1.5, round(args.min_steps / steps_per_epoch, 2))}):
            out = os.path.join(args.output_dir, f"{name}_{n}" + ("" if epochs == 1.5 else f"_{epochs}_epochs"))
            if args.run:
                data = subset(name, n, os.path.join(args.output_dir, "data", f"{name}_{n}"))
                shutil.rmtree(out, ignore_errors=True)
                command = (
                    f"reward.py --model_name_or_path {args.sft_model} --dataset_name {data} --eval_dataset_name "
                    f"{WORLD}/preference --num_epochs {epochs} --num_eval_rows None --output_dir {out}"
                )
                subprocess.run([sys.executable, *command.split()], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            rows.append((label, prompts, pairs, epochs, json.load(open(os.path.join(out, "eval.json")))))
    print("| trained on | annotated prompts | compared pairs | epochs | steps | held-out accuracy | gold agreement |")
    print("|---|---|---|---|---|---|---|")
    for label, prompts, pairs, epochs, r in rows:
        accuracy, agreement = r["rewards/accuracies"], r["gold_agreement"]
        print(f"| {label} | {prompts:,} | {pairs:,} | {epochs:g} | {r['steps']} | {accuracy:.3f} | {agreement:.3f} |")
