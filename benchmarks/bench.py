"""Throughput, peak memory and the fraction of the machine's own matmul peak of each script's training step on
fixed shapes, optionally side by side with TRL (the optional peer harness in ../shared/peers), alternating,
median of --runs.

    python ../shared/peers/make_world.py /tmp/peers/world       # the peer world: tokenizer, tiny Llama, data
    bash ../shared/peers/setup_venvs.sh                          # TRL's two venvs (only needed for --peers)
    python benchmarks/bench.py --runs 3 --peers                  # JSON lines, then the table of medians and ratios
    python benchmarks/bench.py --world data/world --hidden_size 1024 --num_layers 24   # a random 0.5B Llama
    python benchmarks/bench.py --model runs/smollm2 --peers     # SmolLM2-135M (extras/smollm2.py), ours and TRL

Each measurement runs one script, unchanged, in a fresh process (benchmarks/bench.py --child NAME): the script
is executed as __main__ with the shapes below as its arguments, and torch's global hooks take a timestamp after
every optimizer step and count the real (non-pad) tokens of every training forward. As in the peer harness:
steps 3..32 are timed (rollouts 3..12 for PPO), examples are sequences (SFT), pairs (reward, DPO) or episodes
(PPO), and peak memory is the process's max RSS (CPU) or max_memory_allocated (CUDA). PPO's lines add the
rollouts' sampling speed (new tokens per second inside common.sample) and its share of the time. What a short run
also pays is timed apart: the seconds after the last step, the final evaluation (the held-out rows at the scripts'
default --num_eval_rows, the samples cut to 4) and the save.

The machine's peak is measured at the start: the best of a few square matmuls, fp32 on the CPU (MKL or oneDNN,
whichever is faster), bf16 on a GPU. A step's model FLOPs count 2 per matmul parameter per token forward and 4
backward (the LM head on every position): 6N per trained token, 2N per token of a frozen model's forward or of
sampling. TRL does the same work per example, so its fraction is ours times the ratio of examples per second.
On CUDA the SFT line also reports MFU against the vendor's dense bf16 peak.
"""

import json
import os
import platform
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers")
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense, per the vendors' sheets


@dataclass
class Args:
    world: str = "/tmp/peers/world"
    """the peer world (../shared/peers/make_world.py output: tokenizer/, policy/, reward/, *.jsonl), or this
    repository's data/world with --hidden_size and --num_layers (random models on its tokenizer)"""
    scripts: list[str] = field(default_factory=lambda: ["sft", "reward", "dpo", "ppo_epochs1", "ppo_epochs4"])
    """which measurements to take"""
    runs: int = 3
    """rounds; the table reports medians"""
    peers: bool = False
    """also run TRL's trainers (../shared/peers, venvs /tmp/venv-trl and /tmp/venv-trl-ppo), alternating"""
    batch_size: int = 16
    """sequences (SFT), pairs (reward, DPO) or episodes (PPO) per optimizer step or rollout"""
    max_length: int = 128
    """longest sequence of SFT, reward and DPO"""
    response_length: int = 48
    """tokens sampled per PPO response"""
    steps: int = 32
    """optimizer steps per run (PPO: 12 rollouts); the first `warmup` are not timed"""
    warmup: int = 2
    """untimed steps at the start"""
    hidden_size: int | None = None
    """with --num_layers: random Llamas of this size (policy and reward model) instead of the peer's (GPU MFU)"""
    num_layers: int | None = None
    """layers of that Llama"""
    model: str | None = None
    """a pretrained causal LM directory (e.g. runs/smollm2): the peer world's data with this model and its
    tokenizer, and a reward model made of it with a fresh one-output head, for ours and TRL alike"""
    extra: str = ""
    """more arguments for every script, e.g. --extra="--bf16 True --compile True" (the defaults follow the device)"""
    out: str = "/tmp/bench/results.jsonl"
    """raw result lines are appended here"""
    child: str | None = None
    """(internal) run one measurement in this process and print its JSON line"""


def data(world, name):
    """A dataset of the world: the peer world's name.jsonl, or this repository's name/ directory."""
    return f"{world}/{name}.jsonl" if os.path.exists(f"{world}/{name}.jsonl") else f"{world}/{name}"


def prepare(args):
    """Model directories our scripts can load: the peer's weights with its tokenizer beside them, or random Llamas of
    --hidden_size x --num_layers (a policy and a one-label reward model) on the world's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    work = os.path.join(os.path.dirname(args.out), "models")
    if args.model:
        return model_world(args, os.path.join(work, os.path.basename(os.path.normpath(args.model))))
    tokenizer = next(p for p in (f"{args.world}/tokenizer", f"{args.world}/base") if os.path.isdir(p))
    if args.hidden_size and args.num_layers:
        models = {}
        for name, cls in (("policy", LlamaForCausalLM), ("reward", LlamaForSequenceClassification)):
            target = models[name] = os.path.join(work, f"{name}_{args.hidden_size}x{args.num_layers}")
            if not os.path.exists(os.path.join(target, "config.json")):
                tok = AutoTokenizer.from_pretrained(tokenizer)
                cfg = LlamaConfig(
                    vocab_size=len(tok),
                    hidden_size=args.hidden_size,
                    intermediate_size=int(args.hidden_size * 8 / 3) // 64 * 64,
                    num_hidden_layers=args.num_layers,
                    num_attention_heads=args.hidden_size // 64,
                    num_key_value_heads=args.hidden_size // 64,
                    max_position_embeddings=1024,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    bos_token_id=None,
                    tie_word_embeddings=True,
                    num_labels=1,
                )
                cls(cfg).save_pretrained(target)
                tok.save_pretrained(target)
        return models
    for name in ("policy", "reward"):
        target = os.path.join(work, name)
        if not os.path.exists(os.path.join(target, "model.safetensors")):
            shutil.copytree(os.path.join(args.world, name), target, dirs_exist_ok=True)
            shutil.copytree(tokenizer, target, dirs_exist_ok=True)
    return {"policy": os.path.join(work, "policy"), "reward": os.path.join(work, "reward")}


def model_world(args, target: str) -> dict:
    """The peer world with --model as its policy, tokenizer and (with a fresh one-output head, seed 0) reward model,
    laid out as the peer harness reads a world; args.world then points at it, for ours and TRL alike."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.exists(os.path.join(target, "reward", "config.json")):
        for name in ("sft", "preference", "prompts"):
            os.makedirs(target, exist_ok=True)
            shutil.copy(f"{args.world}/{name}.jsonl", target)
        shutil.copytree(args.model, os.path.join(target, "policy"), dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(args.model)
        tok.save_pretrained(os.path.join(target, "tokenizer"))
        torch.manual_seed(0)
        reward = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1)
        reward.config.pad_token_id = reward.config.pad_token_id or reward.config.eos_token_id
        reward.save_pretrained(os.path.join(target, "reward"))
        tok.save_pretrained(os.path.join(target, "reward"))
    args.world = target
    return {"policy": os.path.join(target, "policy"), "reward": os.path.join(target, "reward")}


def matmul_params(model_dir: str) -> tuple[int, int]:
    """(with the LM head, without it): the parameters that multiply every token, from a Llama-style config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    d, hd = cfg.hidden_size, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, o; k, v
    body = cfg.num_hidden_layers * (attention + 3 * d * cfg.intermediate_size)
    return body + cfg.vocab_size * d, body


def flops_per_token(name: str, n: int, body: int) -> float:
    """Model FLOPs per counted token of each measurement: 6 per parameter trained, 2 per parameter of a forward."""
    if name == "sft":
        return 6 * n
    if name == "reward":
        return 6 * body  # a one-output head instead of the LM head
    if name == "dpo":
        return 6 * n + 2 * n  # the policy trained, the reference run every step
    epochs = int(name.removeprefix("ppo_epochs"))  # PPO, per token of an episode (prompt + response):
    # sampling 2N; the rollout's forwards: policy 2N, reference 2N, value and reward 2 x body; each epoch trains the
    # policy (6N) and the value model (6 x body)
    return 2 * n + 4 * n + 4 * body + epochs * (6 * n + 6 * body)


def processor() -> str:
    """The processor the CPU figures come from (with its bf16 and AMX flags), or the GPU's name."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name, flags = platform.processor() or "unknown CPU", set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split()) & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
                break
    return f"{name}, {os.cpu_count()} cores" + (f" ({', '.join(sorted(flags))})" if flags else "")


def matmul_peak(bf16: bool) -> tuple[float, str]:
    """(FLOP/s, how): the best of a few square matmuls in this process's threads, in the precision the scripts run:
    bf16, or fp32 on the CPU through MKL and, where it stays exact to fp32, oneDNN (as the scripts route them)."""
    import torch

    cuda = torch.cuda.is_available()
    dtype, sizes = torch.bfloat16 if bf16 else torch.float32, (4096, 8192) if cuda else (512, 1024, 2048)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = (0.0, "")
    routes = [f"bf16 on {'the GPU' if cuda else 'the CPU'}"] if bf16 else ["none", "bf16"]  # fp32: MKL, then oneDNN
    for route in routes:
        if not bf16:
            torch.backends.mkldnn.matmul.fp32_precision = route
            x = torch.full((64, 64), 1 + 2**-10)
            if route == "bf16" and abs((x @ x)[0, 0].item() - 64 * (1 + 2**-10) ** 2) > 1e-4:
                continue  # oneDNN would compute in bf16 here: not an fp32 peak
        for n in sizes:
            a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
            for _ in range(3):
                a @ b
            sync()
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < 0.5:
                a @ b
                reps += 1
                sync()
            flops = 2 * n**3 * reps / (time.perf_counter() - start)
            how = f"{route} {n}x{n}" if bf16 else f"fp32 {'MKL' if route == 'none' else 'oneDNN'} {n}x{n}"
            best = max(best, (flops, how))
    if not bf16:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    return best


def script_args(name, args, models, output_dir):
    """The command line of one of our scripts for the measured shapes, with the evaluation cut to a minimum."""
    w, b, policy, reward = args.world, args.batch_size, models["policy"], models["reward"]
    shared = f"--batch_size {b} --micro_batch_size {b} --output_dir {output_dir} --gold_scorer None --seed 0"
    length, no_eval = f"--max_length {args.max_length}", "--eval_every 100000"
    samples = "--num_eval_prompts 4 --max_new_tokens 4"  # the final evaluation's, untimed
    sft, preference, prompts = (data(w, name) for name in ("sft", "preference", "prompts"))
    lines = {
        "sft": f"sft.py --model_name_or_path {policy} --dataset_name {sft} --max_steps {args.steps} {length} "
        f"{no_eval} {samples} --num_periodic_eval_prompts 1",
        "reward": f"reward.py --model_name_or_path {reward} --dataset_name {preference} {length} "
        f"--max_steps {args.steps} --sft_dataset_name {sft} --num_normalisation_rows 16 {no_eval}",
        # the reference runs every step, as in the peer's TRL setup (precompute_ref_log_probs=False)
        "dpo": f"dpo.py --model_name_or_path {policy} --dataset_name {preference} --max_steps {args.steps} "
        f"{length} --eval_prompts_name {prompts} --no_precompute_ref_logps {no_eval} {samples}",
    }
    for epochs in (1, 4):  # 12 rollouts: 32 steps' worth
        lines[f"ppo_epochs{epochs}"] = (
            f"ppo.py --model_name_or_path {policy} --reward_model_name_or_path {reward} --num_mini_batches 1 "
            f"--dataset_name {prompts} --num_ppo_epochs {epochs} --max_steps {args.steps * 12 // 32} "
            f"--response_length {args.response_length} --log_samples_every 100000 {no_eval} {samples} "
            "--num_periodic_eval_prompts 1"
        )
    script, *argv = f"{lines[name]} {shared} {args.extra}".split()
    return script, argv


def child(args):
    """Run one of our scripts in this process, timing its optimizer steps; print one JSON line."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    sys.path.insert(0, ROOT)
    import common  # the module the scripts import: their forwards are counted, PPO's sampling timed, through it

    name = args.child
    models = prepare(args)
    output_dir = os.path.join(os.path.dirname(args.out), f"out_{name}")
    shutil.rmtree(output_dir, ignore_errors=True)
    script, argv = script_args(name, args, models, output_dir)
    stamps, tokens, stamps_tokens = [], [0], []
    generations = []  # (start, end, tokens drawn) of every common.sample call: PPO's generation speed
    untimed_forward, untimed_sample = common.forward, common.sample
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None

    def counted_forward(model, ids, mask, **kwargs):  # real tokens of every training forward (compiled or not)
        if torch.is_grad_enabled():
            tokens[0] += int(mask.sum())
            stamps_tokens.append((len(stamps), tokens[0]))
        return untimed_forward(model, ids, mask, **kwargs)

    def timed_sample(*a, **k):
        sync()
        start = time.perf_counter()
        out = untimed_sample(*a, **k)
        sync()
        generations.append((start, time.perf_counter(), out.numel()))
        return out

    common.forward, common.sample = counted_forward, timed_sample
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    sys.argv, sys.path[0] = [script, *argv], ROOT  # as `python script.py` from the repository root
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        finally:
            sys.stdout = stdout
    finished = time.perf_counter()
    per_round = int(name.removeprefix("ppo_epochs")) if name.startswith("ppo") else 1  # optimizer steps per rollout
    rounds = [stamps[i] for i in range(per_round - 1, len(stamps), per_round)]  # the end of each step or rollout
    warm = args.warmup
    n = len(rounds) - warm
    if n < 1:
        sys.exit(f"{name}: {len(rounds)} steps, not more than the {warm} warm-up steps: raise --steps")
    wall = rounds[-1] - rounds[warm - 1]
    if name.startswith("ppo"):  # as the peer: prompt tokens + response_length per episode
        prompts = [row["prompt"] for row in common.load_splits(data(args.world, "prompts"), [["prompt"]])[0][:400]]
        tok = common.load_tokenizer(models["policy"])
        mean_prompt = sum(len(common.encode_prompt(tok, p)) for p in prompts) / len(prompts)
        token_count = n * args.batch_size * (mean_prompt + args.response_length)
    else:  # tokens of the training forwards after the warm-up steps
        token_count = tokens[0] - max((t for s, t in stamps_tokens if s < warm), default=0)
    result = {
        "trainer": name,
        "impl": "ours",
        "steps": n,
        "examples_per_s": n * args.batch_size / wall,
        "tokens_per_s": token_count / wall,
        "wall_s": wall,
        "after_training_s": finished - stamps[-1],  # the final evaluation (num_eval_rows at its default) and the save
        "torch_threads": torch.get_num_threads(),
    }
    timed = [
        (end - start, drawn) for start, end, drawn in generations if start > rounds[warm - 1] and end <= rounds[-1]
    ]
    if timed:  # the rollouts' sampling alone: new tokens per second, and its share of the timed wall clock
        seconds = sum(t for t, _ in timed)
        result.update(generation_tokens_per_s=sum(d for _, d in timed) / seconds, generation_share=seconds / wall)
    n_params, body = matmul_params(models["policy"])
    result["model_flops_per_s"] = flops_per_token(name, n_params, body) * result["tokens_per_s"]
    if torch.cuda.is_available():
        result.update(device=torch.cuda.get_device_name(), peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak and name == "sft":
            result["mfu"] = result["model_flops_per_s"] / (peak * 1e12)
    else:
        result.update(device="cpu", peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


PEER_JOBS = {
    "sft": ("/tmp/venv-trl/bin/python", "trl_sft.py", []),
    "reward": ("/tmp/venv-trl/bin/python", "trl_reward.py", []),
    "dpo": ("/tmp/venv-trl/bin/python", "trl_dpo.py", []),
    "ppo_epochs1": ("/tmp/venv-trl-ppo/bin/python", "trl_ppo.py", ["--ppo-epochs", "1"]),
    "ppo_epochs4": ("/tmp/venv-trl-ppo/bin/python", "trl_ppo.py", ["--ppo-epochs", "4"]),
}


def measure(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"trainer"')]
    if proc.returncode or not lines:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(args):
    if args.peers and (args.batch_size, args.max_length, args.response_length) != (16, 128, 48):
        sys.exit("--peers: the peer harness's shapes are fixed (batch_size 16, max_length 128, response_length 48)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    prepare(args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    env["WANDB_MODE"] = "disabled"
    passthrough = [a for a in sys.argv[1:] if a not in ("--peers",)]
    import torch

    bf16 = "--bf16 True" in args.extra or (torch.cuda.is_available() and "--bf16 False" not in args.extra)
    peak, how = matmul_peak(bf16)
    machine = processor()
    print(f"machine: {machine}; matmul peak {peak / 1e9:.0f} GFLOP/s ({how})", flush=True)
    results = []
    with open(args.out, "a") as out:
        for i in range(args.runs):
            for name in args.scripts:
                jobs = [("ours", [sys.executable, os.path.abspath(__file__), *passthrough, "--child", name], ROOT)]
                if args.peers:
                    py, script, extra = PEER_JOBS[name]
                    steps = args.steps * 12 // 32 if name.startswith("ppo") else args.steps  # PPO: rollouts
                    extra = [*extra, "--steps", str(steps), "--warmup", str(args.warmup)]
                    jobs.append(("trl", [py, script, "--world", args.world, *extra], PEERS))
                for impl, cmd, cwd in jobs if i % 2 == 0 else jobs[::-1]:  # alternate who goes first
                    r = {**measure(cmd, cwd, env), "impl": impl, "run": i, "machine": machine, "peak_flops": peak}
                    results.append(r)
                    out.write(json.dumps(r) + "\n")
                    print(json.dumps(r), flush=True)
    print(f"\n{machine}; matmul peak {peak / 1e9:.0f} GFLOP/s ({how}); medians of {args.runs}\n")
    print("| trainer | ours examples/s | TRL examples/s | ratio | ours of peak | TRL of peak | ours MB | TRL MB |")
    print("|---|---|---|---|---|---|---|---|")

    def med(name, impl, k):
        values = [r[k] for r in results if r["trainer"] == name and r["impl"] == impl]
        return statistics.median(values) if values else float("nan")

    for name in args.scripts:
        mem = "peak_mem_mb" if any("peak_mem_mb" in r for r in results) else "peak_rss_mb"
        ours, trl = med(name, "ours", "examples_per_s"), med(name, "trl", "examples_per_s")
        fraction = med(name, "ours", "model_flops_per_s") / peak  # TRL does the same work per example
        print(
            f"| {name} | {ours:.2f} | {trl:.2f} | {ours / trl:.2f}x | {fraction:.1%} | {fraction * trl / ours:.1%} | "
            f"{med(name, 'ours', mem):.0f} | {med(name, 'trl', 'peak_rss_mb'):.0f} |"
        )
    for name in args.scripts:
        generation = [r for r in results if r["trainer"] == name and "generation_tokens_per_s" in r]
        if generation:
            tokens_per_s = statistics.median(r["generation_tokens_per_s"] for r in generation)
            share = statistics.median(r["generation_share"] for r in generation)
            print(f"{name}: sampling {tokens_per_s:.0f} new tokens/s, {share:.0%} of the timed time (medians)")
    after = {name: med(name, "ours", "after_training_s") for name in args.scripts}
    print(
        "after the last step (the final evaluation and the save), ours: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in after.items())
    )


if __name__ == "__main__":
    a = tyro.cli(Args, use_underscores=True)
    child(a) if a.child else main(a)
