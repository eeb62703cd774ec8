"""Supervised fine-tuning: teach a causal LM to continue prompts the way the demonstrations do.

    python sft.py                                   # the offline world: trains data/world/base from scratch
    python sft.py --model_name_or_path EleutherAI/pythia-1b-deduped \\
        --dataset_name trl-lib/tldr --learning_rate 3e-6 --output_dir runs/sft_tldr

Data: {"prompt", "completion"} (text or chat messages), {"messages"} (the last message is the
completion) or {"text"} (loss on every token). The loss is the mean negative log-likelihood of the
completion tokens only, with EOS appended so the model learns to stop (GUIDE details 1-3).
Writes a `save_pretrained` model + tokenizer to --output_dir, and eval.json with eval_loss, eos_rate
and, on the offline world, gold_score.
"""
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, get_cosine_schedule_with_warmup

import common


@dataclass
class Args:
    model_name_or_path: str = "data/world/base"
    """hub id or local directory; a directory with a config but no weights is initialised at random"""
    dataset_name: str = "data/world/sft"
    """hub id, local directory or .json/.jsonl file with prompt/completion, messages or text columns"""
    output_dir: str = "runs/sft"
    """where the trained model, tokenizer and eval.json are written (atomically)"""
    seed: int = 1
    """seed of initialisation, data order and sampling"""
    num_epochs: float = 2.0
    """passes over the training data"""
    max_steps: int | None = None
    """stop after this many optimizer steps (a cap for quick runs; the schedule follows it)"""
    learning_rate: float = 2e-3
    """peak AdamW learning rate (the world trains from scratch; use ~1e-5 to fine-tune a real model)"""
    warmup_steps: int = 30
    """linear warmup steps (at most a tenth of all steps), then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    batch_size: int = 32
    """sequences per optimizer step"""
    micro_batch_size: int = 32
    """sequences per forward pass; batch_size / micro_batch_size steps of gradient accumulation"""
    max_length: int = 256
    """longest prompt + completion in tokens: longer completions are cut, too-long prompts dropped (counted)"""
    eval_every: int = 200
    """steps between evaluations of the held-out loss and sample generations"""
    num_eval_samples: int = 256
    """held-out prompts sampled at the end for eos_rate and gold_score"""
    max_new_tokens: int = 64
    """longest sampled completion"""
    temperature: float = 1.0
    """sampling temperature of the evaluation samples"""
    gold_eval: bool = True
    """score samples with the offline world's gold rater (data/gold.py); turn off for other tasks"""
    save_every: int = 0
    """write a checkpoint (model, optimizer, scheduler, RNG, data position) every this many steps; 0: never"""
    resume: bool = False
    """continue from the checkpoint in --output_dir"""
    skip_nonfinite: bool = False
    """skip a batch whose loss is not finite instead of stopping"""
    bf16: bool = True
    """bf16 autocast on CUDA (the CPU always runs fp32)"""
    compile: bool = True
    """torch.compile the model on CUDA (never on CPU)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf-reference"
    """wandb project name"""


def tokenize(tok, rows, fmt: list[str], max_length: int, split: str = "train"):
    """(prompt_ids, completion_ids) per row. Rows whose prompt leaves no room for a completion are dropped,
    over-long completions are cut (losing their EOS); both are counted and said."""
    out, dropped, cut = [], 0, 0
    for row in rows:
        p, c = common.encode_demonstration(tok, row, fmt)
        if len(p) >= max_length:
            dropped += 1
            continue
        if len(p) + len(c) > max_length:
            c, cut = c[: max_length - len(p)], cut + 1
        out.append((p, c))
    if dropped or cut:
        print(f"note: {split}: {dropped} rows dropped (prompt >= max_length {max_length}), {cut} completions cut to fit")
    if not out:
        common.fail(f"no {split} row fits in max_length {max_length}")
    return out


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    common.check_args(args)
    common.seed_everything(args.seed)
    common.check_output_dir(args, "sft.py")
    device, autocast, use_compile = common.device_and_autocast(args.bf16, args.compile)
    run_name, log, history = common.start_tracking(args, "sft")

    # ---- data and model --------------------------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    train_rows, eval_rows, fmt = common.load_splits(
        args.dataset_name, [["prompt", "completion"], ["messages"], ["text"]], seed=args.seed)
    train = tokenize(tok, train_rows, fmt, args.max_length)
    evals = tokenize(tok, eval_rows, fmt, args.max_length, "eval")
    path = args.model_name_or_path
    if os.path.isdir(path) and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        print(f"note: {path} holds a config but no weights: initialising the model at random (seed {args.seed})")
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        model.resize_token_embeddings(max(len(tok), model.get_input_embeddings().num_embeddings))
        model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
        model = model.to(device)
    else:
        model = common.load_model(AutoModelForCausalLM, path, tok, device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"data: {len(train)} train / {len(evals)} eval rows ({fmt})")
    forward_model = torch.compile(model) if use_compile else model  # sampling uses the eager model

    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        common.fail(f"{len(train)} training rows is fewer than one batch of {args.batch_size}")
    total_steps = math.ceil(args.num_epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-5, fused=True,
                                  weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, total_steps // 10), total_steps)

    @torch.inference_mode()
    def eval_loss():
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(evals), args.micro_batch_size):
            batch = evals[i:i + args.micro_batch_size]
            with autocast:
                logps, n = common.completion_logps(forward_model, *zip(*batch), tok.pad_token_id, device)
            total, count = total - logps.sum().item(), count + int(n.sum())
        model.train()
        return total / count

    def generate_samples(n):
        model.eval()
        prompts = [p or c[:8] for p, c in evals[:n]]  # {"text"} rows have no prompt: start from their first tokens
        metrics, samples = common.evaluate(model, tok, prompts, args.max_new_tokens,
                                           args.temperature, 64, autocast, gold=args.gold_eval)
        model.train()
        return metrics, samples

    # ---- training ---------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    lengths = [len(p) + len(c) for p, c in train]
    batches, step, elapsed = [], 0, 0.0
    if args.resume:
        state = common.load_checkpoint(args.output_dir, {"model": model}, optimizer, scheduler)
        step, batches, elapsed, history[:] = state["step"], state["batches"], state["elapsed"], state["history"]
        rng.bit_generator.state = state["numpy_rng"]
    start = time.time() - elapsed
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="sft", mininterval=5)
    while step < total_steps:
        if not batches:  # a new epoch: shuffled batches of similar lengths (less padding)
            batches = [[int(i) for i in b] for b in common.length_grouped_batches(lengths, args.batch_size, rng)
                       if len(b) == args.batch_size]
        batch = [train[i] for i in batches.pop()]
        # loss = mean NLL over every predicted completion token of the step; a row with no prompt ({"text"}
        # without BOS) cannot predict its first token
        n_tokens = sum(len(c) - (not p) for p, c in batch)
        loss_sum = 0.0
        for m in range(0, len(batch), args.micro_batch_size):
            micro = batch[m:m + args.micro_batch_size]
            with autocast:
                loss = -common.completion_logps(forward_model, *zip(*micro), tok.pad_token_id, device)[0].sum() / n_tokens
            loss.backward()
            loss_sum += loss.detach()
        step += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if common.finite_or_stop(loss_sum + grad_norm, "loss", step, args.skip_nonfinite):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update()
        if step % 20 == 0 or step == total_steps:
            metrics = {"train/loss": float(loss_sum), "train/grad_norm": float(grad_norm),
                       "train/lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch}
            progress.set_postfix(loss=f"{metrics['train/loss']:.3f}")
            log(metrics, step)
        if step % args.eval_every == 0 and step < total_steps:
            loss_value = eval_loss()
            metrics, samples = generate_samples(64)
            tqdm.write(f"step {step}: eval_loss {loss_value:.4f} eos_rate {metrics['eos_rate']:.2f}"
                       + "".join(f"\n  {s['prompt']} ->{s['response']}" for s in samples[:2]))
            log({"eval/loss": loss_value, **{f"eval/{k}": v for k, v in metrics.items()}}, step)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            common.save_checkpoint(args.output_dir, "sft.py", args, {"model": model}, optimizer, scheduler,
                                   {"step": step, "batches": batches, "numpy_rng": rng.bit_generator.state,
                                    "elapsed": time.time() - start, "history": history})
    progress.close()
    train_seconds = time.time() - start

    # ---- evaluation -------------------------------------------------------------------------------
    results = {"eval_loss": eval_loss()}
    metrics, samples = generate_samples(args.num_eval_samples)
    results.update(metrics, steps=step, train_seconds=round(train_seconds, 1))
    print(json.dumps(results, indent=2))
    for s in samples[:4]:
        print(f"  {s['prompt']} ->{s['response']}" + (f"   [gold {s['gold']}]" if "gold" in s else ""))
    log({f"eval/{k}": v for k, v in results.items()}, step)

    # ---- saving -----------------------------------------------------------------------------------
    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
        common.write_jsonl(os.path.join(tmp, "samples.jsonl"), samples)
        common.write_jsonl(os.path.join(tmp, "metrics.jsonl"), history)

    common.save_atomic(args.output_dir, "sft.py", args, write)
    print(f"saved {args.output_dir}")
