"""Eager attention against SDPA on the CPU: the seconds and peak memory of one training step (forward and
backward of a causal LM, fp32, the scripts' matmul settings) for each model size and sequence length, each
measurement in a fresh process. plumbing.load_model's choice of attention on the CPU is read off this table.

    python benchmarks/attention.py                                   # the toy model, a ~38M Llama, SmolLM2's shape
    python benchmarks/attention.py --models toy --lengths 128 256    # a part

The models are random weights on a config (the world's base model; a Llama of hidden size 512 and 12 layers on the
world's tokenizer; SmolLM2-135M's config, 30 layers, 9 heads sharing 3 key-value heads, a 49,152-token
vocabulary), the batch `--batch_size` sequences of which a quarter is right-padded to half the length, as batches
of mixed lengths are. A step is timed after one untimed step; the peak is the process's maximum resident memory.
"""

import json
import os
import resource
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = {  # SmolLM2-135M-Instruct's config (extras/smollm2.py makes the model itself)
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
MEDIUM = {"hidden_size": 512, "intermediate_size": 1344, "num_hidden_layers": 12, "num_attention_heads": 8}


@dataclass
class Args:
    models: list[str] = field(default_factory=lambda: ["toy", "medium", "smollm2"])
    """which model shapes: toy (data/world/base), medium (~38M), smollm2 (135M)"""
    lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    """sequence lengths in tokens"""
    batch_size: int = 16
    """sequences per step"""
    steps: int = 2
    """timed steps (after one untimed)"""
    child: str | None = None
    """(internal) "model,length,implementation": measure one and print its JSON line"""


def config(name: str):
    from transformers import AutoConfig, LlamaConfig

    base = AutoConfig.from_pretrained(os.path.join(ROOT, "data", "world", "base"))
    if name == "toy":
        return base
    shape = {"medium": MEDIUM, "smollm2": SMOLLM2}[name]
    return LlamaConfig(**{**base.to_dict(), **shape, "max_position_embeddings": 1024})


def child(args):
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, ROOT)
    import plumbing

    name, length, implementation = args.child.split(",")
    length = int(length)
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet):  # the scripts' matmul settings, without the note
        plumbing.device_and_autocast()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(name), attn_implementation=implementation).train()
    ids = torch.randint(3, model.config.vocab_size, (args.batch_size, length))
    mask = torch.ones_like(ids)
    mask[: args.batch_size // 4, length // 2 :] = 0  # a quarter of the rows half padding
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"model": name, "length": length, "attention": implementation, "step_s": min(times[1:]), "peak_mb": peak}
    row["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    print(json.dumps(row), flush=True)


def main(args):
    rows = []
    for name in args.models:
        for length in args.lengths:
            for implementation in ("eager", "sdpa"):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name},{length},{implementation}"]
                cmd += ["--batch_size", str(args.batch_size), "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
                if out.returncode or not lines:
                    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
                rows.append(json.loads(lines[-1]))
                print(lines[-1], flush=True)
    from bench import processor

    print(f"\n{processor()}; fp32; {args.batch_size} sequences a step; the best of {args.steps} timed steps\n")
    print("| model | length | eager s | SDPA s | SDPA / eager | eager peak MB | SDPA peak MB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for length in args.lengths:
            e, s = (next(r for r in rows if (r["model"], r["length"], r["attention"]) == (name, length, i))
                    for i in ("eager", "sdpa"))  # fmt: skip
            print(
                f"| {name} ({e['parameters_m']:.1f}M) | {length} | {e['step_s']:.2f} | {s['step_s']:.2f} | "
                f"{s['step_s'] / e['step_s']:.2f} | {e['peak_mb']:,.0f} | {s['peak_mb']:,.0f} |"
            )


if __name__ == "__main__":
    a = tyro.cli(Args, use_underscores=True)
    child(a) if a.child else main(a)
