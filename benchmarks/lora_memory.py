"""Peak memory of ppo.py and dpo.py with LoRA (--lora_r 16) against full fine-tuning, on the same batches and
lengths: each run a process of its own, its peak resident memory read from the kernel when it ends (wait4).

    python extras/smollm2.py --output_dir runs/real/smollm2 && python data/chat_world.py runs/real/world_chat
    python benchmarks/lora_memory.py --model runs/real/smollm2 --chat runs/real/world_chat

A reward model for PPO is made first (reward.py for 2 steps: what it scores does not matter here). On the CPU the
peak is the process's max RSS; on CUDA it would be the allocator's, which this script does not read.
"""

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    model: str = "runs/real/smollm2"
    """the policy (and the reward model's start): a save_pretrained directory"""
    chat: str = "runs/real/world_chat"
    """the world's data as chat messages (data/chat_world.py)"""
    output_dir: str = "runs/lora_memory"
    """where the runs go"""
    lora_r: int = 16
    """the adapters' rank"""


def peak_run(command: list[str]) -> tuple[float, float]:
    """Run `python command` from the repository root; (its peak RSS in MB, the CPU seconds it used: unlike wall
    time, not stretched by other work on the machine)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full pipe would stop the child
        proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            err.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{err.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss is in KB on Linux


if __name__ == "__main__":
    args = tyro.cli(Args)
    out, chat = args.output_dir, args.chat
    evals = "--num_eval_prompts 8 --max_new_tokens 16 --eval_every 100000 --gold_scorer None"
    if not os.path.exists(f"{out}/reward/eval.json"):
        os.makedirs(f"{out}/pairs", exist_ok=True)  # 64 pairs and 16 held out: its evaluation is not the point
        for split, n in (("train", 64), ("test", 16)):
            with open(f"{chat}/preference/{split}.jsonl") as f, open(f"{out}/pairs/{split}.jsonl", "w") as g:
                g.writelines(f.readlines()[:n])
        peak_run(
            f"reward.py --model_name_or_path {args.model} --dataset_name {out}/pairs --sft_dataset_name "
            f"{chat}/sft --max_steps 2 --batch_size 8 --micro_batch_size 8 --max_length 128 "
            f"--num_normalisation_rows 8 --gold_scorer None --output_dir {out}/reward".split()
        )
    commands = {
        "ppo.py": f"ppo.py --model_name_or_path {args.model} --reward_model_name_or_path {out}/reward --dataset_name "
        f"{chat}/prompts --max_steps 2 --batch_size 16 --micro_batch_size 16 --max_prompt_length 96 "
        f"--response_length 48 {evals}",
        "dpo.py": f"dpo.py --model_name_or_path {args.model} --dataset_name {chat}/preference --eval_prompts_name "
        f"{chat}/prompts --max_steps 2 --batch_size 8 --micro_batch_size 8 --max_length 128 --num_eval_rows 16 "
        f"{evals}",
    }
    rows = []
    for script, command in commands.items():
        for name, extra in (("full fine-tuning", ""), (f"LoRA r = {args.lora_r}", f" --lora_r {args.lora_r}")):
            target = f"{out}/{script[:-3]}_{'lora' if extra else 'full'}"
            mb, seconds = peak_run(f"{command}{extra} --output_dir {target}".split())
            rows.append(f"| `{script}` | {name} | {mb:,.0f} MB | {seconds:.0f} s |")
            print(rows[-1], flush=True)
    print("\n| script | training | peak RSS | CPU time |\n|---|---|---|---|\n" + "\n".join(rows))
