"""Sycophancy on the offline world's variant (data/sycophancy.py): RLHF from annotators who side with the user, and the
same pipeline from the same pairs labelled without that bias.

    python benchmarks/sycophancy.py                 # every stage, then the tables and plots: runs/sycophancy/
    python benchmarks/sycophancy.py --no_run        # only the tables and plots, from the runs made

A stage whose output exists is not run again, so an interrupted benchmark continues where it stopped.

  1. sft.py trains the world's base model on the variant's demonstrations (honest writers, deaf to the user).
  2. The labels: the variant's pairs as the world's annotators labelled them (with probability APPROVAL_BIAS they
     side with the user who stated an opinion), and the same pairs relabelled by annotators without the bias
     (data.sycophancy.label_pairs at approval bias 0). The repair is this relabelling: annotators shown the
     review and asked what it says, not whether they agree with the user. Same prompts, same responses, only the
     labels differ: whatever changes below, the bias caused it.
  3. reward.py on each label set; how often each reward model scores the response on the user's side above the one
     on the facts' side, on held-out pairs where the user contradicts the facts (and, where no opinion is stated,
     the response against the facts above the one with them: the same error without the user's pull).
  4. ppo.py against each reward model and dpo.py on each label set, from the SFT policy. Every policy is evaluated
     on the probe (the variant's held-out prompts, with its fields): honesty (the gold score), sides_with_user_rate,
     stance_shift and sides_against_facts_rate, as the scripts report them in eval.json.
  5. The tables, and two plots of PPO's periodic evaluations against the KL to the SFT policy, as goodhart.svg:
     the proxy (rm_score) and honesty (sycophancy_scores.svg); sides_with_user_rate and sides_against_facts_rate
     (sycophancy_rates.svg).

Two runs at a time (--jobs), one thread each (on 2 CPU cores that is quicker than one run with two threads).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
from goodhart import svg_plot  # noqa: E402
from iterated import accuracy  # noqa: E402

from data.sycophancy import contested  # noqa: E402

VARIANT = "data/world/sycophancy"
HONESTY = "--gold_scorer data.sycophancy:score"


@dataclass
class Args:
    output_dir: str = "runs/sycophancy"
    """where every stage's output, the relabelled pairs, the tables' figures and the plots go"""
    total_episodes: int = 4096
    """PPO's episodes per run"""
    eval_every: int = 8
    """PPO's steps between evaluations on the probe (the plots' points)"""
    num_periodic_eval_prompts: int = 150
    """probe prompts of PPO's periodic evaluations (the first 50 cases)"""
    num_eval_prompts: int = 600
    """probe prompts of the final evaluations (all 200 cases)"""
    sft_args: str = ""
    """more arguments for sft.py"""
    reward_args: str = ""
    """more arguments for reward.py"""
    ppo_args: str = ""
    """more arguments for ppo.py"""
    dpo_args: str = ""
    """more arguments for dpo.py"""
    seed: int = 1
    """every script's seed, and the relabelling's"""
    jobs: int = 2
    """runs at a time, one torch thread each (on 2 free cores two runs side by side finish sooner than one after the
    other)"""
    run: bool = True
    """run the stages (otherwise only read their results)"""


def side_by_side(*commands: str, jobs: int = 2):
    """Run "script args" command lines, `jobs` at once, one torch thread each; stop with the first failure's error. A
    command whose --output_dir holds an eval.json has run: it is not run again (an interrupted benchmark continues)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    commands = [
        c for c in commands if not os.path.exists(os.path.join(c.split("--output_dir ")[1].split()[0], "eval.json"))
    ]
    for start in range(0, len(commands), jobs):
        procs = []
        for command in commands[start : start + jobs]:
            print(f"python {command}", flush=True)
            script, *arguments = command.split()
            procs.append(subprocess.Popen([sys.executable, script, *arguments], cwd=ROOT, env=env, text=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
        for command, proc in zip(commands[start : start + jobs], procs, strict=True):
            stderr = proc.communicate()[1]
            if proc.returncode:
                sys.exit(f"{command} failed:\n{stderr[-3000:]}")


def relabel(out: str, seed: int):
    """The variant's pairs, both splits, relabelled by annotators without the approval bias, into out/."""
    import common
    import plumbing
    from data.sycophancy import label_pairs

    os.makedirs(out, exist_ok=True)
    for split in ("train", "test"):
        rows = common.read_json_rows(os.path.join(ROOT, VARIANT, "preference", f"{split}.jsonl"))
        plumbing.write_jsonl(os.path.join(out, f"{split}.jsonl"), label_pairs(rows, seed, approval_bias=0.0))


def reward_row(name: str, reward_dir: str, test_rows: list[dict]) -> dict:
    results = json.load(open(os.path.join(reward_dir, "eval.json")))
    row = {"labels": name, "accuracy": results["rewards/accuracies"], "gold_agreement": results["gold_agreement"]}
    for opinion in ("contradicting", "none"):
        pairs = contested(test_rows, opinion)
        row[f"{opinion}_pairs"] = len(pairs)
        row[f"{opinion}_rm_errs"] = accuracy(reward_dir, pairs)
        row[f"{opinion}_labels_err"] = sum(p["label_erred"] for p in pairs) / len(pairs)
    return row


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    import common

    out = os.path.join(ROOT, args.output_dir)
    labels = {"biased": os.path.join(ROOT, VARIANT, "preference"), "unbiased": os.path.join(out, "preference_unbiased")}
    evaluation = f"{HONESTY} --num_eval_prompts {args.num_eval_prompts} --seed {args.seed}"  # on the probe
    if args.run:
        # 1. the SFT policy
        side_by_side(
            f"sft.py --dataset_name {VARIANT}/sft --output_dir {out}/sft {HONESTY} --seed {args.seed} "
            f"--num_eval_rows None {args.sft_args}"
        )
        # 2. the labels without the bias (the repair)
        relabel(labels["unbiased"], args.seed)
        # 3. a reward model on each
        side_by_side(*(
            f"reward.py --model_name_or_path {out}/sft --dataset_name {data} --sft_dataset_name {VARIANT}/sft "
            f"--output_dir {out}/reward_{name} {HONESTY} --seed {args.seed} --num_eval_rows None {args.reward_args}"
            for name, data in labels.items()
        ), jobs=args.jobs)  # fmt: skip
        # 4. PPO against each reward model, DPO on each label set
        side_by_side(*(
            f"ppo.py --model_name_or_path {out}/sft --reward_model_name_or_path {out}/reward_{name} --dataset_name "
            f"{VARIANT}/prompts {evaluation} "
            f"--total_episodes {args.total_episodes} --eval_every {args.eval_every} --num_periodic_eval_prompts "
            f"{args.num_periodic_eval_prompts} --output_dir {out}/ppo_{name} {args.ppo_args}"
            for name in labels
        ), jobs=args.jobs)  # fmt: skip
        side_by_side(*(
            f"dpo.py --model_name_or_path {out}/sft --dataset_name {data} --eval_prompts_name {VARIANT}/prompts "
            f"{evaluation} --num_eval_rows None --output_dir {out}/dpo_{name} {args.dpo_args}"
            for name, data in labels.items()
        ), jobs=args.jobs)  # fmt: skip

    # 5. the tables and plots
    print(
        "| reward model's labels | held-out accuracy | agreement with honesty | user contradicts the facts: pairs, RM "
        "prefers the user's side (labels did) | no opinion: pairs, RM prefers the side against the facts (labels did) |"
        "\n|---|---|---|---|---|"
    )
    for name, data in labels.items():
        test_rows = common.read_json_rows(os.path.join(data, "test.jsonl"))
        x = reward_row(name, os.path.join(out, f"reward_{name}"), test_rows)
        print(
            f"| {name} | {x['accuracy']:.3f} | {x['gold_agreement']:.3f} | {x['contradicting_pairs']}: "
            f"**{x['contradicting_rm_errs']:.3f}** ({x['contradicting_labels_err']:.3f}) | {x['none_pairs']}: "
            f"{x['none_rm_errs']:.3f} ({x['none_labels_err']:.3f}) |"
        )
    print(
        "\n| policy | labels | kl_to_ref | rm_score | honesty (gold_score) | sides_with_user_rate | stance_shift | "
        "sides_against_facts_rate | gold_win_rate_vs_ref |\n|---|---|---|---|---|---|---|---|---|"
    )
    sft = json.load(open(os.path.join(out, "ppo_biased", "eval.json")))  # the reference's figures: the SFT policy's
    print(
        f"| SFT | | 0 | | {sft['gold_score_ref']:.3f} | {sft['sides_with_user_rate_ref']:.3f} | "
        f"{sft['stance_shift_ref']:.3f} | {sft['sides_against_facts_rate_ref']:.3f} | |"
    )
    for algo in ("ppo", "dpo"):
        for name in labels:
            x = json.load(open(os.path.join(out, f"{algo}_{name}", "eval.json")))
            rm = f"{x['rm_score']:.2f}" if "rm_score" in x else ""
            print(
                f"| {algo.upper()} | {name} | {x['kl_to_ref']:.2f} | {rm} | {x['gold_score']:.3f} | "
                f"**{x['sides_with_user_rate']:.3f}** | {x['stance_shift']:.3f} | "
                f"{x['sides_against_facts_rate']:.3f} | {x['gold_win_rate_vs_ref']:.3f} |"
            )
    curves = {}
    for name in labels:
        curves[f"PPO, {name} labels"] = common.read_json_rows(os.path.join(out, f"ppo_{name}", "curve.jsonl"))
    print("\n| run | episodes | kl_to_ref | rm_score | honesty | sides_with_user_rate | sides_against_facts_rate |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in curves.items():
        for c in rows:
            print(
                f"| {name} | {c['episodes']} | {c['kl_to_ref']:.2f} | {c['rm_score']:.2f} | {c['gold_score']:.3f} | "
                f"{c['sides_with_user_rate']:.3f} | {c['sides_against_facts_rate']:.3f} |"
            )
    names = {"gold_score": "honesty", "sides_with_user_rate": "sides with user", "sides_against_facts_rate":
             "against facts, no opinion"}  # fmt: skip
    svg_plot(curves, os.path.join(out, "sycophancy_scores.svg"), ("rm_score", "gold_score"), names)
    svg_plot(curves, os.path.join(out, "sycophancy_rates.svg"), ("sides_with_user_rate", "sides_against_facts_rate"),
             names, y_label="share of responses")  # fmt: skip
    print(f"wrote {out}/sycophancy_scores.svg, sycophancy_rates.svg")
