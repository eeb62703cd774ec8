"""Iterated RLHF on the offline world: the policy's own samples are sent to the (simulated) humans, the reward model
learns from their labels, and PPO runs again. Does it repair the reward hacking of benchmarks/goodhart.py?

    python sft.py && python reward.py               # round 0's policy and reward model (runs/sft, runs/reward)
    python benchmarks/iterated.py                   # 3 rounds with kl_coef 0 and 0.05, then the table and plot
    python benchmarks/iterated.py --no_run          # only the table and plot, from the runs made

Each round r and each kl_coef:
  1. PPO continues from the current policy (round 0: the SFT policy) against the current reward model, for
     `episodes_per_round` episodes; the KL is always to the SFT policy (ppo.py --ref_model_name_or_path);
  2. two responses for each of `label_prompts` training prompts are sampled from the new policy, as PPO samples
     (rollout temperature, response length), and labelled by a simulated annotator (data/annotators.py: the gold
     rater through Bradley-Terry noise); likewise `heldout_prompts` held-out prompts, whose pairs measure how
     well the current reward model orders the current policy's samples (how far off-policy it has drifted);
  3. the next reward model is trained by reward.py from the SFT backbone on everything labelled so far: the
     world's pairs and every round's. From scratch on the union rather than continued from the last: old and new
     labels then weigh alike, with nothing forgotten and no new schedule to tune; it costs one reward.py run on
     the growing union a round.
The table gives, for each round's policy, the reward model's accuracy on that policy's held-out samples before and
after retraining (and its ceiling: how often the gold rater agrees with the annotators' labels of those pairs),
the proxy (rm_score of the reward model the policy was trained against), the gold score, the KL to the SFT policy
and distinct-2; iterated.svg draws each round's proxy and gold score against its KL, as goodhart.svg does (each
round's proxy is a different reward model's score). --no_relabel runs the control: the same rounds of PPO, each
against round 0's reward model, without new labels.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
from goodhart import svg_plot  # noqa: E402


@dataclass
class Args:
    sft_model: str = "runs/sft"
    """the SFT policy: round 0's policy, and every round's KL reference"""
    reward_model: str = "runs/reward"
    """round 0's reward model (reward.py on the world's pairs)"""
    preference_data: str = "data/world/preference"
    """the human-labelled pairs every reward model also learns from"""
    prompts: str = "data/world/prompts"
    """prompts: PPO's and the labelled samples' (train split), the held-out pairs' (test split)"""
    rounds: int = 3
    """PPO runs per kl_coef (round 0 against the original reward model)"""
    kl_coefs: list[float] = field(default_factory=lambda: [0.0, 0.05])
    """the KL penalties compared (0: the over-optimisation of benchmarks/goodhart.py)"""
    episodes_per_round: int = 4096
    """PPO episodes of each round"""
    label_prompts: int = 2000
    """training prompts whose pair of samples is labelled after each round"""
    heldout_prompts: int = 500
    """held-out prompts whose labelled pairs measure the reward model on the policy's samples"""
    response_length: int = 48
    """tokens sampled per response (ppo.py's default)"""
    rollout_temperature: float = 0.7
    """sampling temperature of the labelled samples (ppo.py's rollouts')"""
    ppo_args: str = ""
    """more arguments for ppo.py (e.g. smaller runs)"""
    reward_args: str = ""
    """more arguments for reward.py"""
    output_dir: str = "runs/iterated"
    """where every round's models, labels and results go"""
    seed: int = 1
    """seed of sampling and labelling"""
    relabel: bool = True
    """label each round's samples and retrain the reward model (--no_relabel: the control, every round against
    round 0's reward model, with the same restarts of PPO; its results go to kl_<coef>_no_relabel)"""
    run: bool = True
    """run the rounds (otherwise only read their results)"""


def script(name: str, arguments: str):
    """Run one of the repository's scripts as a user would; stop with its error if it fails."""
    proc = subprocess.run([sys.executable, name, *arguments.split()], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} {arguments} failed:\n{proc.stderr[-3000:]}")


def sample_pairs(policy_dir: str, prompts: list[str], args, seed: int) -> tuple[list[str], list[str]]:
    """Two responses per prompt from the policy, as its PPO rollouts sample them (cut after EOS), as text."""
    import torch
    from transformers import AutoModelForCausalLM

    import common
    import plumbing

    torch.manual_seed(seed)
    tok = common.load_tokenizer(policy_dir)
    model = plumbing.load_model(AutoModelForCausalLM, policy_dir, tok, torch.device("cpu")).eval()
    ids = [common.encode_prompt(tok, p) for p in prompts]
    firsts, seconds = [], []
    for i in range(0, len(ids), 64):
        batch, mask = common.pad(ids[i : i + 64] * 2, tok.pad_token_id, "left")
        raw = common.sample(model, batch, mask, args.response_length, args.rollout_temperature, tok.eos_token_id)
        texts = tok.batch_decode(
            common.truncate_after_eos(raw, tok.eos_token_id, tok.pad_token_id)[0], skip_special_tokens=True
        )
        firsts, seconds = firsts + texts[: len(texts) // 2], seconds + texts[len(texts) // 2 :]
    return firsts, seconds


def accuracy(reward_dir: str, rows: list[dict]) -> float:
    """How often the reward model orders labelled pairs as the annotator did: reward.py's held-out accuracy (ties
    count half), with its scoring."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import common
    import plumbing
    import reward

    tok = common.load_tokenizer(reward_dir)
    model = plumbing.load_model(AutoModelForSequenceClassification, reward_dir, tok, torch.device("cpu")).eval()
    pairs = reward.tokenize_rankings(tok, rows, ["prompt", "chosen", "rejected"], max_length=10_000)
    with torch.inference_mode():
        scores = [
            reward.ranking_rewards(model, pairs[i : i + 64], tok.pad_token_id, "cpu") for i in range(0, len(pairs), 64)
        ]
    return float(reward.pair_metrics(*reward.ranked_pairs(torch.cat(scores).double()))["rewards/accuracies"])


def label_ceiling(rows: list[dict]) -> float:
    """How often the gold rater agrees with the annotators' labels (ties count half): what a reward model can reach."""
    import torch

    import reward
    from data.gold import gold_score

    gold = torch.tensor([[gold_score(r["chosen"]), gold_score(r["rejected"])] for r in rows], dtype=torch.float64)
    return float(reward.pair_metrics(gold[:, 0], gold[:, 1])["rewards/accuracies"])


def run_rounds(args, kl_coef: float, out: str):
    """The rounds of one kl_coef; each round's figures are appended to out/rounds.jsonl."""
    import common
    import plumbing
    from data.annotators import label_pairs

    train_prompts, heldout = (
        [r["prompt"] for r in rows] for rows in common.load_splits(args.prompts, [["prompt"]], seed=args.seed)[:2]
    )
    human = common.load_splits(args.preference_data, [["prompt", "chosen", "rejected"]], seed=args.seed)[0]
    rng = random.Random(args.seed)
    policy, reward, labelled = args.sft_model, args.reward_model, list(human)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for r in range(args.rounds):
        # 1. PPO from the current policy against the current reward model, the KL to the SFT policy
        ppo_dir = f"{out}/ppo_{r}"
        script(
            "ppo.py",
            f"--model_name_or_path {policy} --ref_model_name_or_path {args.sft_model} --reward_model_name_or_path "
            f"{reward} --kl_coef {kl_coef} --total_episodes {args.episodes_per_round} --output_dir {ppo_dir} "
            f"--seed {args.seed + r} {args.ppo_args}",
        )
        results = json.load(open(f"{ppo_dir}/eval.json"))
        # 2. the new policy's samples, labelled by the simulated annotator
        prompts = rng.sample(train_prompts, args.label_prompts)
        new = label_pairs(prompts, *sample_pairs(ppo_dir, prompts, args, args.seed + r), seed=args.seed + r)
        test_prompts = heldout[: args.heldout_prompts]
        test = label_pairs(test_prompts, *sample_pairs(ppo_dir, test_prompts, args, 10_000 + r), seed=10_000 + r)
        before = accuracy(reward, test)  # the reward model this policy was trained against, on its samples
        # 3. the next reward model, from the SFT backbone, on everything labelled so far
        after = None
        if args.relabel:
            labelled += new
            data, reward = f"{out}/labels_{r}", f"{out}/reward_{r + 1}"
            os.makedirs(data)
            plumbing.write_jsonl(f"{data}/train.jsonl", labelled)
            plumbing.write_jsonl(f"{data}/test.jsonl", test)
            script(
                "reward.py",
                f"--model_name_or_path {args.sft_model} --dataset_name {data} --output_dir {reward} "
                f"--num_eval_rows None {args.reward_args}",
            )
            after = json.load(open(f"{reward}/eval.json"))["rewards/accuracies"]
        row = {"kl_coef": kl_coef, "round": r, "episodes": (r + 1) * args.episodes_per_round}
        row.update(labelled_pairs=len(labelled), rm_accuracy_on_policy=before, new_rm_accuracy_on_policy=after)
        row.update(labels_ceiling=label_ceiling(test))
        row.update(
            {k: results[k] for k in ("rm_score", "gold_score", "gold_win_rate_vs_ref", "kl_to_ref", "distinct_2")}
        )
        with open(f"{out}/rounds.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        policy = ppo_dir


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    suffix = "" if args.relabel else "_no_relabel"
    for kl in args.kl_coefs:
        out = os.path.join(args.output_dir, f"kl_{kl}{suffix}")
        if args.run:
            run_rounds(args, kl, out)
    print("| run | round | episodes | RM accuracy on the policy's samples: its RM -> retrained (labels' ceiling) | "
          "rm_score | gold_score | gold_win_rate_vs_ref | kl_to_ref | distinct_2 |\n"
          "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    curves = {}
    for kl in args.kl_coefs:
        name = f"kl_coef {kl}" + ", no new labels" * (not args.relabel)
        rows = [json.loads(line) for line in open(os.path.join(args.output_dir, f"kl_{kl}{suffix}", "rounds.jsonl"))]
        curves[name] = rows
        for x in rows:
            after = "-" if x["new_rm_accuracy_on_policy"] is None else f"{x['new_rm_accuracy_on_policy']:.3f}"
            print(f"| {name} | {x['round']} | {x['episodes']} | {x['rm_accuracy_on_policy']:.3f} -> {after} "
                  f"({x['labels_ceiling']:.3f}) | {x['rm_score']:.2f} | {x['gold_score']:.3f} | "
                  f"{x['gold_win_rate_vs_ref']:.2f} | {x['kl_to_ref']:.2f} | {x['distinct_2']:.3f} |")  # fmt: skip
    plot = os.path.join(args.output_dir, f"iterated{suffix}.svg")
    svg_plot(curves, plot)
    print(f"wrote {plot}")
