"""Which feedback to collect: reward models from pairs, rankings of 4, 1-7 ratings and thumbs at equal annotation
effort, and policies from the same responses' pairs (DPO) or thumbs (KTO), all against the world's gold rater.

    python sft.py                                   # the SFT model every run starts from (runs/sft)
    OMP_NUM_THREADS=1 python benchmarks/feedback.py # the runs (two at a time), then the tables
    python benchmarks/feedback.py --no_run          # only the tables, from runs already made

Effort is counted two ways. Equal responses judged: `responses` responses are half as many pairs, a quarter as
many rankings of 4, or as many ratings or thumbs. Equal prompts annotated: `prompts` pairs or rankings, or the
ratings or thumbs of those prompts' two responses each. The world's ratings and thumbs judge the preference pairs'
responses (the first 2n rows judge the first n pairs'), so at equal responses the pairs, ratings and thumbs are
the same texts. Every reward model takes `steps` steps of 128 sequences (64 pairs, 32 rankings or 128 judged
responses) and is evaluated on the world's 1,000 held-out preference pairs, whose labels the gold rater matches on
0.899: the ceiling. The rating losses are compared on the same ratings: regression, ordinal, and Bradley-Terry on
the pairs of a prompt's two ratings where they differ, the difference as margin (the pairs' path, --margin_column).

The policies: DPO on `policy_pairs` pairs, KTO on the thumbs of their responses, and KTO with only a fifth of
the thumbs up (all the thumbs down; desirable_weight 5, so that w_D n_D / (w_U n_U) stays in the paper's [1, 4/3]),
each for one epoch of 64 sequences a step, evaluated against the SFT policy on 256 held-out prompts.
"""

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "data", "world")


@dataclass
class Args:
    sft_model: str = "runs/sft"
    """the SFT model every run starts from"""
    responses: int = 8000
    """responses judged in the comparison at equal responses"""
    prompts: int = 4000
    """prompts annotated in the comparison at equal prompts (at responses / 2 the pairs, ratings and thumbs of the
    two comparisons are the same runs)"""
    steps: int = 120
    """steps of each reward model (128 sequences a step)"""
    policy_pairs: int = 4000
    """preference pairs of DPO, whose responses' thumbs KTO learns from"""
    learning_rate: float = 5e-5
    """DPO's and KTO's learning rate"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """seeds of every run (reward.py's and dpo.py's default is 1)"""
    jobs: int = 2
    """runs at once (each with one thread: set OMP_NUM_THREADS=1)"""
    output_dir: str = "runs/feedback"
    """where the runs and their data subsets go"""
    run: bool = True
    """train (otherwise only read the runs' eval.json)"""


def subset(name: str, n: int, out: str, keep=None) -> str:
    """A dataset directory with the first n training rows of the world's `name` (those `keep` accepts, if given) and
    its whole test split."""
    os.makedirs(out, exist_ok=True)
    with open(f"{WORLD}/{name}/train.jsonl") as f:
        rows = [json.loads(line) for line in itertools.islice(f, n)]
    with open(f"{out}/train.jsonl", "w") as g:
        g.writelines(json.dumps(r) + "\n" for r in rows if keep is None or keep(r))
    shutil.copy(f"{WORLD}/{name}/test.jsonl", f"{out}/test.jsonl")
    return out


def rating_pairs(n: int, out: str) -> str:
    """The pairs of the first n ratings (and of the whole test split): each prompt's two responses where their
    ratings differ, the higher chosen, the difference the margin column m (a pairs dataset for reward.py
    --margin_column m; the runs are evaluated on the preference pairs all the same)."""
    os.makedirs(out, exist_ok=True)
    for split, limit in (("train", n), ("test", None)):
        with open(f"{WORLD}/ratings/{split}.jsonl") as f:
            rows = [json.loads(line) for line in itertools.islice(f, limit)]
        with open(f"{out}/{split}.jsonl", "w") as g:
            for a, b in zip(rows[0::2], rows[1::2], strict=True):
                if a["rating"] != b["rating"]:
                    hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
                    pair = {"prompt": a["prompt"], "chosen": hi["completion"], "rejected": lo["completion"]}
                    g.write(json.dumps({**pair, "m": float(hi["rating"] - lo["rating"])}) + "\n")
    return out


def mean_and_error(values):
    """'mean' of one run, 'mean +- standard error' of several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values) / len(values) ** 0.5:.3f}"


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    out, data = args.output_dir, os.path.join(args.output_dir, "data")
    R, P = args.responses, args.prompts
    on_pairs = f"--eval_dataset_name {WORLD}/preference"  # for the datasets that are not the world's pairs
    # a reward model's run: (dataset, its first rows, reward.py's options; 128 sequences a step)
    pairs, rankings, ratings, thumbs = (
        ("preference", R // 2, "--batch_size 64"),
        ("ranking", R // 4, f"--batch_size 32 {on_pairs}"),
        ("ratings", R, "--batch_size 128"),
        ("binary", R, "--batch_size 128"),
    )
    tables = {  # title: [(label, run, responses judged, prompts annotated)]
        f"Reward models at {R:,} responses judged": [
            ("pairs", pairs, R, R // 2),
            ("rankings of 4", rankings, R, R // 4),
            ("ratings", ratings, R, R // 2),
            ("thumbs", thumbs, R, R // 2),
        ],
        f"Reward models at {P:,} prompts annotated": [
            ("pairs", ("preference", P, pairs[2]), 2 * P, P),
            ("rankings of 4", ("ranking", P, rankings[2]), 4 * P, P),
            ("ratings", ("ratings", 2 * P, ratings[2]), 2 * P, P),
            ("thumbs", ("binary", 2 * P, thumbs[2]), 2 * P, P),
        ],
        f"The rating losses on {R:,} ratings": [
            ("regression", ratings, R, R // 2),
            ("ordinal", ("ratings", R, "--batch_size 128 --rating_loss ordinal"), R, R // 2),
            ("Bradley-Terry, margin", ("rating_pairs", R, f"--batch_size 64 --margin_column m {on_pairs}"), R, R // 2),
            ("Bradley-Terry", ("rating_pairs", R, f"--batch_size 64 {on_pairs}"), R, R // 2),
        ],
    }
    n, ups = args.policy_pairs, itertools.count()
    policy_runs = [  # (label, script, (dataset, its rows, a filter of them), options)
        ("DPO, pairs", "dpo.py", ("preference", n, None), "--batch_size 32 --num_eval_rows 250"),
        ("KTO, their thumbs", "kto.py", ("binary", 2 * n, None), "--batch_size 64 --num_eval_rows 500"),
        (
            "KTO, a fifth of the thumbs up",
            "kto.py",
            ("binary", 2 * n, lambda row: not row["label"] or next(ups) % 5 == 0),  # every down, every fifth up
            "--batch_size 64 --num_eval_rows 500 --desirable_weight 5",
        ),
    ]

    def directory(name: str, rows: int) -> str:
        return os.path.join(data, f"{name}_{rows}")

    def reward_dir(run) -> str:
        """A reward model's run directory, without its seed: one per dataset and loss, whichever tables show it."""
        name, rows, options = run
        loss = "_ordinal" * ("ordinal" in options) + "_margin" * ("margin" in options)
        return os.path.join(out, f"reward_{name}_{rows}{loss}")

    commands = []  # (output directory, command line)
    for seed in args.seeds:
        for run in dict.fromkeys(run for table in tables.values() for _, run, *_ in table):  # each run once
            name, rows, options = run
            run_dir = f"{reward_dir(run)}_seed{seed}"
            command = (
                f"reward.py --model_name_or_path {args.sft_model} --dataset_name {directory(name, rows)} "
                f"--max_steps {args.steps} --num_epochs 1000 --eval_every 100000 --num_eval_rows None --seed {seed} "
                f"--output_dir {run_dir} "
                f"{options}"
            )
            commands.append((run_dir, command))
        for label, script, (name, rows, keep), options in policy_runs:
            run_dir = os.path.join(out, f"policy_{label.split(',')[0]}_{'fifth' if keep else 'all'}_seed{seed}")
            dataset = directory(name + ("_fifth" if keep else ""), rows)
            command = (
                f"{script} --model_name_or_path {args.sft_model} --learning_rate {args.learning_rate} --seed {seed} "
                f"--micro_batch_size 32 --num_epochs 1 --eval_every 100000 --output_dir {run_dir} "
                f"--dataset_name {dataset} {options}"
            )
            commands.append((run_dir, command))

    if args.run:
        for name, rows in {run[:2] for table in tables.values() for _, run, *_ in table}:
            if name == "rating_pairs":
                rating_pairs(rows, directory(name, rows))
            else:
                subset(name, rows, directory(name, rows))
        for _, _, (name, rows, keep), _ in policy_runs:
            subset(name, rows, directory(name + ("_fifth" if keep else ""), rows), keep)

        def train(run):
            run_dir, command = run
            if os.path.isfile(os.path.join(run_dir, "eval.json")):
                return  # made already
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"python {command}", flush=True)
            subprocess.run([sys.executable, *command.split()], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(train, commands))

    def results(run_dir_prefix: str):
        """Every seed's eval.json of a run."""
        return [json.load(open(f"{run_dir_prefix}_seed{s}/eval.json")) for s in args.seeds]

    seeds = ", ".join(map(str, args.seeds))
    for title, table in tables.items():
        print(f"\n{title} ({args.steps} steps of 128 sequences; seeds {seeds}; the ceiling 0.899)\n")
        print("| trained on | rows | responses judged | prompts | held-out accuracy | gold agreement |")
        print("|---|---|---|---|---|---|")
        for label, run, responses, prompts in table:
            r = results(reward_dir(run))
            with open(os.path.join(directory(*run[:2]), "train.jsonl")) as f:
                n_rows = sum(1 for _ in f)
            accuracy = mean_and_error([x["rewards/accuracies"] for x in r])
            agreement = mean_and_error([x["gold_agreement"] for x in r])
            print(f"| {label} | {n_rows:,} | {responses:,} | {prompts:,} | {accuracy} | {agreement} |")
    print(f"\nPolicies from {args.policy_pairs:,} pairs' responses, against the SFT policy (seeds {seeds})\n")
    print("| policy | rows | steps | gold_win_rate_vs_ref | kl_to_ref | gold_score (SFT's) | eos_rate | distinct_2 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, _, (name, rows, keep), _ in policy_runs:
        r = results(os.path.join(out, f"policy_{label.split(',')[0]}_{'fifth' if keep else 'all'}"))
        with open(os.path.join(directory(name + ("_fifth" if keep else ""), rows), "train.jsonl")) as f:
            n_rows = sum(1 for _ in f)
        cells = [mean_and_error([x[k] for x in r]) for k in ("gold_win_rate_vs_ref", "kl_to_ref")]
        gold = f"{mean_and_error([x['gold_score'] for x in r])} ({statistics.mean(x['gold_score_ref'] for x in r):.3f})"
        cells += [gold, *(mean_and_error([x[k] for x in r]) for k in ("eos_rate", "distinct_2"))]
        print(f"| {label} | {n_rows:,} | {r[0]['steps']} | " + " | ".join(cells) + " |")
