"""Supervised fine-tuning: teach a causal LM to continue prompts the way the demonstrations do.

    python sft.py                                   # the offline world: trains data/world/base from scratch
    python sft.py --model_name_or_path EleutherAI/pythia-1b-deduped \\
        --dataset_name trl-lib/tldr --learning_rate 3e-6 --output_dir runs/sft_tldr

Data: {"prompt", "completion"} (text or chat messages), {"messages"} (the last message is the completion) or
{"text"} (loss on every token). The loss is the mean negative log-likelihood of the completion tokens only,
with EOS appended so the model learns to stop (docs/implementation_details.md, details 1, 2 and 5; the steps below
are numbered as its "sft.py" list). Writes a `save_pretrained` model + tokenizer to --output_dir, with
eval.json (held-out loss, EOS rate and, given a gold scorer, gold_score).
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
from transformers import AutoModelForCausalLM

import common
import plumbing


@dataclass
class Args:
    # ---- algorithm ----
    learning_rate: float = 2e-3
    """peak AdamW learning rate (the world trains from scratch; use ~1e-5 to fine-tune a real model)"""
    num_epochs: float = 2.0
    """passes over the training data"""
    max_steps: int | None = None
    """stop after this many steps (a cap for quick runs; the schedule follows it)"""
    batch_size: int = 32
    """sequences per step (one optimizer step); under torchrun the global batch, split over the processes"""
    micro_batch_size: int = 32
    """sequences per forward/backward pass of one process; the rest of its share is gradient accumulation"""
    warmup_steps: int = 30
    """linear warmup steps, then cosine decay to 0"""
    max_warmup_fraction: float = 0.1
    """the warmup takes at most this share of all steps (short runs)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (0.95: the usual choice when training from scratch, as in nanoGPT)"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    # ---- LoRA (off by default) ----
    lora_r: int = 0
    """rank of the LoRA adapters trained in place of the full weights (Hu et al. 2021); 0: full fine-tuning"""
    lora_alpha: float = 16.0
    """LoRA's scale: an adapter adds (lora_alpha / lora_r) B A to its layer's frozen weight"""
    lora_dropout: float = 0.0
    """dropout on the adapters' inputs (0: none in RL, detail 9)"""
    lora_target_modules: tuple[str, ...] | None = None
    """the layers given adapters, by module name (None: every linear layer inside the transformer blocks)"""
    # ---- data ----
    model_name_or_path: str = "data/world/base"
    """hub id or local directory; a directory with a config but no weights is initialised at random"""
    dataset_name: str = "data/world/sft"
    """hub id, local directory or .json/.jsonl file with prompt/completion, messages or text columns"""
    max_length: int = 256
    """longest prompt + completion in tokens: longer completions are cut, too-long prompts dropped (counted)"""
    # ---- evaluation ----
    eval_every: int = 200
    """steps between evaluations (held-out loss and samples)"""
    num_eval_rows: int | None = 256
    """held-out demonstrations of the loss, every eval_every steps and at the end (the first of the eval split;
    None: all)"""
    num_periodic_eval_prompts: int = 64
    """held-out prompts sampled at the evaluations during training (the first of the num_eval_prompts)"""
    num_eval_prompts: int = 256
    """held-out prompts sampled at the end"""
    max_new_tokens: int = 64
    """longest evaluation sample in tokens"""
    eval_temperature: float = 1.0
    """sampling temperature of the evaluation samples (1: the distribution the model learnt)"""
    eval_batch_size: int = 64
    """prompts sampled at once in evaluation"""
    gold_scorer: str | None = "data.gold:score"
    """the task's true score of samples, "module:function" taking (prompts, responses) and returning one score
    each; the offline world's gold rater by default; None turns it off"""
    log_every: int = 20
    """steps between logged training metrics"""
    # ---- run ----
    output_dir: str = "runs/sft"
    """where the trained model, tokenizer and eval.json are written (atomically)"""
    seed: int = 1
    """seed of initialisation, data order and sampling"""
    save_every: int = 0
    """write a checkpoint (model, optimizer, scheduler, RNG, data position) every this many steps; 0: never"""
    resume: bool = False
    """continue from the checkpoint in --output_dir"""
    skip_nonfinite: bool = False
    """skip a batch whose loss is not finite instead of stopping"""
    bf16: bool | None = None
    """bf16 autocast (--bf16 True/False); by default on with CUDA, off on the CPU"""
    compile: bool | None = None
    """torch.compile the model (--compile True/False); by default on with CUDA, off on the CPU"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf-reference"
    """wandb project name"""


def tokenize(tok, rows, columns: list[str], max_length: int, split: str = "train"):
    """(prompt_ids, completion_ids) per row (step 1). Rows whose prompt leaves no room for a completion are
    dropped, over-long completions are cut (losing their EOS); both are counted."""
    out, dropped, cut = [], 0, 0
    for row in rows:
        p, c = common.encode_demonstration(tok, row, columns)
        if len(p) >= max_length:
            dropped += 1
            continue
        if len(p) + len(c) > max_length:
            c, cut = c[: max_length - len(p)], cut + 1
        out.append((p, c))
    if dropped or cut:
        print(f"note: {split}: {dropped} rows dropped (prompt >= max_length {max_length}), {cut} completions cut")
    if not out:
        plumbing.fail(f"no {split} row fits in max_length {max_length}")
    return out


if __name__ == "__main__":
    # ---- TRY NOT TO MODIFY: arguments, seeding, device ------------------------------------------------
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "lora_alpha max_steps batch_size micro_batch_size adam_eps max_grad_norm log_every eval_every "
            "num_eval_prompts max_new_tokens eval_temperature eval_batch_size num_epochs max_length "
            "num_periodic_eval_prompts num_eval_rows",
            "[0, inf)": "lora_r learning_rate weight_decay save_every warmup_steps",
            "[0, 1)": "lora_dropout adam_betas",
            "[0, 1]": "max_warmup_fraction",
            "(-inf, inf)": "seed",
        },
    )
    plumbing.check_global_batch(args.batch_size)
    plumbing.seed_everything(args.seed)
    plumbing.check_output_dir(args, "sft.py")
    gold_scorer = plumbing.load_function(args.gold_scorer, "gold_scorer")
    device, autocast, use_compile, bf16 = plumbing.device_and_autocast(args.bf16, args.compile)
    log, history = plumbing.start_tracking(args, "sft")

    # ---- TRY NOT TO MODIFY: data and model ------------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    accepted = [["prompt", "completion"], ["messages"], ["text"]]  # the column sets a demonstration may have
    train_rows, eval_rows, columns = common.load_splits(args.dataset_name, accepted, seed=args.seed)
    train = tokenize(tok, train_rows, columns, args.max_length)
    evals = tokenize(tok, eval_rows, columns, args.max_length, "eval")
    held_out = evals[: args.num_eval_rows]  # the rows of the held-out loss (the samples' prompts come from evals)
    # a directory with a config and no weights (the world's base model) is initialised at random (seed above)
    model = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device, init_without_weights=True)
    model = common.add_lora(model, args, bf16=bf16)  # with --lora_r: adapters trained, the rest frozen
    plumbing.shard_model(model)  # under torchrun: FSDP2 (then every rank samples from its own seed)
    common.seed_sampling(args.seed)
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"data: {len(train)} train / {len(evals)} eval rows ({columns}), the held-out loss on "
        f"{len(held_out)}"
    )
    forward_model = torch.compile(model) if use_compile else model  # sampling uses the eager model

    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        plumbing.fail(f"{len(train)} training rows is fewer than one batch of {args.batch_size}")
    total_steps = math.ceil(args.num_epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    trained = [p for p in model.parameters() if p.requires_grad]  # what is frozen is not in the optimizer
    optimizer = torch.optim.AdamW(trained, **adamw, fused=True)
    warmup = min(args.warmup_steps, int(total_steps * args.max_warmup_fraction))
    scheduler = common.warmup_cosine_schedule(optimizer, warmup, total_steps)

    @torch.inference_mode()
    def eval_loss():
        """The held-out loss: mean NLL per completion token (each rank scores its share of the rows)."""
        model.eval()
        local_evals, rows = common.shard(held_out), []
        for i in range(0, len(local_evals), args.micro_batch_size):
            prompts, completions = zip(*local_evals[i : i + args.micro_batch_size], strict=True)
            with autocast:
                logps, n = common.completion_logps(forward_model, prompts, completions, tok.pad_token_id, device)
            rows += zip(logps.tolist(), n.tolist(), strict=True)
        model.train()
        logps, n = np.array(common.gather(rows)[: len(held_out)]).T
        return float(-logps.sum() / n.sum())

    def generate_samples(n):
        model.eval()
        prompts = [p or c[:8] for p, c in evals[:n]]  # {"text"} rows have no prompt: start from their first tokens
        metrics, samples = common.evaluate(model, tok, prompts, args, autocast, gold_scorer=gold_scorer)
        model.train()
        return metrics, samples

    # ---- ALGO LOGIC: training ------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    lengths = [len(p) + len(c) for p, c in train]
    batches, step, elapsed = [], 0, 0.0
    if args.resume:
        state = plumbing.load_checkpoint(args.output_dir, {"model": model}, optimizer, scheduler)
        step, batches, elapsed, history[:] = state["step"], state["batches"], state["elapsed"], state["history"]
        rng.bit_generator.state = state["numpy_rng"]
    start = time.time() - elapsed
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="sft", mininterval=5)
    while step < total_steps:
        # 2. a new epoch: shuffled batches of similar lengths (less padding), right-padded in completion_logps
        if not batches:
            grouped = common.length_grouped_batches(lengths, args.batch_size, rng)
            batches = [[int(i) for i in b] for b in grouped if len(b) == args.batch_size]
        batch = [train[i] for i in batches.pop()]
        # 3. loss = mean NLL over every predicted completion token of the step; a row with no prompt ({"text"}
        # without BOS) cannot predict its first token. Under torchrun each rank sums over its share of the batch
        # (divided by the whole batch's count): the ranks' gradients add up to the step's.
        n_tokens = sum(len(c) - (not p) for p, c in batch)
        local_batch, loss_sum = common.shard(batch), torch.zeros((), device=device)
        for m in range(0, len(local_batch), args.micro_batch_size):
            prompts, completions = zip(*local_batch[m : m + args.micro_batch_size], strict=True)
            with autocast:
                logps = common.completion_logps(forward_model, prompts, completions, tok.pad_token_id, device)[0]
                loss = -logps.sum() / n_tokens
            loss.backward()
            loss_sum += loss.detach()
        loss_sum = common.reduce_sum(loss_sum)
        step += 1
        grad_norm = common.clip_grad_norm(trained, args.max_grad_norm)
        if plumbing.finite_or_stop(loss_sum + grad_norm, "loss", step, args.skip_nonfinite):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update()

        # ---- TRY NOT TO MODIFY: logging, periodic evaluation, checkpoints ---------------------------------
        if step % args.log_every == 0 or step == total_steps:
            metrics = {
                "train/loss": float(loss_sum),
                "train/grad_norm": float(grad_norm),
                "train/lr": scheduler.get_last_lr()[0],
                "train/epoch": step / steps_per_epoch,
            }
            progress.set_postfix(loss=f"{metrics['train/loss']:.3f}")
            log(metrics, step)
        if step % args.eval_every == 0 and step < total_steps:
            loss_value = eval_loss()
            metrics, samples = generate_samples(min(args.num_periodic_eval_prompts, args.num_eval_prompts))
            shown = "".join(f"\n  {s['prompt']} ->{s['response']}" for s in samples[:2])
            tqdm.write(f"step {step}: eval/loss {loss_value:.4f} eval/eos_rate {metrics['eos_rate']:.2f}{shown}")
            log({"eval/loss": loss_value, **{f"eval/{k}": v for k, v in metrics.items()}}, step)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            state = {
                "step": step,
                "batches": batches,
                "numpy_rng": rng.bit_generator.state,
                "elapsed": time.time() - start,
                "history": history,
            }
            plumbing.save_checkpoint(args.output_dir, "sft.py", args, {"model": model}, optimizer, scheduler, state)
    progress.close()
    train_seconds = time.time() - start

    # ---- 4. evaluation: the held-out loss, and samples of held-out prompts ------------------------------
    results = {"loss": eval_loss()}
    metrics, samples = generate_samples(args.num_eval_prompts)
    results.update(metrics, steps=step, train_seconds=round(train_seconds, 1))
    print(json.dumps(results, indent=2))
    for s in samples[:4]:
        print(f"  {s['prompt']} ->{s['response']}" + (f"   [gold {s['gold']}]" if "gold" in s else ""))
    log({f"eval/{k}": v for k, v in results.items()}, step)

    # ---- TRY NOT TO MODIFY: saving ---------------------------------------------------------------------------
    weights = plumbing.full_state_dict(model)  # under torchrun gathered from the shards; None in one process

    def write(tmp):
        plumbing.save_model(model, tmp, weights)
        tok.save_pretrained(tmp)
        plumbing.write_json(os.path.join(tmp, "eval.json"), results)
        plumbing.write_jsonl(os.path.join(tmp, "samples.jsonl"), samples)
        plumbing.write_jsonl(os.path.join(tmp, "metrics.jsonl"), history)

    plumbing.write_atomic(args.output_dir, "sft.py", args, write)
    print(f"saved {args.output_dir}")
