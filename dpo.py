"""Direct preference optimisation: learn from preference pairs without a reward model or RL.

    python dpo.py                               # the offline world: from runs/sft, on data/world/preference
    python dpo.py --loss_type ipo --beta 0.1    # or cdpo, hinge, simpo; --rpo_alpha 1 adds NLL on chosen

DPO (Rafailov et al. 2023, eq. 7) fits the policy whose implicit reward beta * log(pi / pi_ref) explains
the preferences under Bradley-Terry. With h = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)]:

    sigmoid  -log sigmoid(beta * h)                                     DPO
    cdpo     -(1 - e) log sigmoid(beta * h) - e log sigmoid(-beta * h)  conservative DPO (label smoothing e)
    ipo      (h - 1 / (2 * beta))^2, with per-token average log-probs   IPO (Azar et al. 2023, eq. 17)
    hinge    relu(1 - beta * h)                                         SLiC (Zhao et al. 2023)
    simpo    -log sigmoid(beta * h' - gamma), h' the difference of per-token average log-probs of the
             policy alone: no reference model                           SimPO (Meng et al. 2024, eq. 6)

and --rpo_alpha adds alpha * (per-token NLL of the chosen response) (RPO, Pang et al. 2024). The
reference log-probs are computed once before training (--precompute_ref_logps, on by default), so only
the policy is in memory while training; the reference is loaded again to evaluate against it.
"""
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

import common


@dataclass
class Args:
    model_name_or_path: str = "runs/sft"
    """the SFT model: the policy starts from it and, unless --ref_model_name_or_path, is the reference"""
    ref_model_name_or_path: str | None = None
    """a different reference model (defaults to model_name_or_path)"""
    dataset_name: str = "data/world/preference"
    """preference pairs {prompt, chosen, rejected} (text or chat messages): hub id, directory or .json/.jsonl"""
    eval_prompts_name: str = "data/world/prompts"
    """prompts whose held-out split the policy and the reference are sampled on for evaluation"""
    output_dir: str = "runs/dpo"
    """where the policy, tokenizer and eval.json are written (atomically)"""
    loss_type: Literal["sigmoid", "cdpo", "ipo", "hinge", "simpo"] = "sigmoid"
    """the preference loss (see the module docstring)"""
    beta: float = 0.1
    """strength of the KL constraint: the implicit reward is beta * log(pi / pi_ref)"""
    label_smoothing: float = 0.1
    """cdpo: the assumed probability that a label is flipped"""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma"""
    rpo_alpha: float = 0.0
    """weight of the NLL of the chosen response added to the loss (RPO); 0 turns it off"""
    precompute_ref_logps: bool = True
    """compute the reference log-probs once before training: one model in memory, the same result"""
    seed: int = 1
    """seed of the data order and sampling"""
    num_epochs: float = 1.0
    """passes over the training pairs"""
    max_steps: int | None = None
    """stop after this many optimizer steps (a cap for quick runs; the schedule follows it)"""
    learning_rate: float = 2e-5
    """peak AdamW learning rate (~5e-7 to 1e-6 for a real model)"""
    warmup_steps: int = 20
    """linear warmup steps (at most a tenth of all steps), then cosine decay to 0"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    batch_size: int = 32
    """pairs per optimizer step"""
    micro_batch_size: int = 32
    """pairs per forward pass (2x sequences), in training and evaluation; batch_size / micro_batch_size steps of
    gradient accumulation"""
    max_length: int = 256
    """longest prompt + response in tokens; longer pairs are dropped (counted)"""
    eval_every: int = 100
    """steps between evaluations of the held-out implicit-reward accuracy"""
    num_eval_prompts: int = 256
    """held-out prompts sampled from the policy and the reference at the end"""
    max_new_tokens: int = 64
    """longest sampled response"""
    temperature: float = 0.7
    """sampling temperature of the evaluation (the same in dpo.py, ppo.py and rlaif.py)"""
    gold_eval: bool = True
    """score samples with the offline world's gold rater (data/gold.py); turn off for other tasks"""
    save_every: int = 0
    """write a checkpoint (policy, optimizer, scheduler, RNG, data position) every this many steps; 0: never"""
    resume: bool = False
    """continue from the checkpoint in --output_dir"""
    skip_nonfinite: bool = False
    """skip a batch whose loss is not finite instead of stopping"""
    bf16: bool = True
    """bf16 autocast on CUDA (the CPU always runs fp32)"""
    compile: bool = True
    """torch.compile the policy's training forward on CUDA (never on CPU)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf-reference"
    """wandb project name"""


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
             rejected_lengths, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, rpo_alpha=0.0):
    """Per-pair losses and the implicit rewards (chosen_rewards, rejected_rewards) of the DPO family.
    Log-probs are sums over each response's tokens; lengths count those tokens."""
    if loss_type in ("ipo", "simpo"):  # these compare per-token averages
        chosen_logps, rejected_logps = chosen_logps / chosen_lengths, rejected_logps / rejected_lengths
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps / chosen_lengths, ref_rejected_logps / rejected_lengths
    if loss_type == "simpo":  # no reference: the policy's own (average) log-probs are the reward
        ref_chosen_logps, ref_rejected_logps = torch.zeros_like(chosen_logps), torch.zeros_like(rejected_logps)
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "simpo":
        losses = -F.logsigmoid(beta * h - simpo_gamma)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if rpo_alpha:
        nll = -chosen_logps if loss_type in ("ipo", "simpo") else -chosen_logps / chosen_lengths
        losses = losses + rpo_alpha * nll
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_logps(model, pairs, pad_id, device):
    """Summed log-probs and lengths of chosen and rejected responses, in one forward of 2B sequences."""
    prompts = [p for p, *_ in pairs] * 2
    responses = [c for _, c, *_ in pairs] + [r for _, _, r, *_ in pairs]
    logps, lengths = common.completion_logps(model, prompts, responses, pad_id, device)
    return logps[:len(pairs)], logps[len(pairs):], lengths[:len(pairs)], lengths[len(pairs):]


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    common.check_args(args)
    if not 0 <= args.label_smoothing < 0.5:  # at 0.5 the labels carry no information; above, they are reversed
        common.fail(f"--label_smoothing is the probability that a label is flipped, in [0, 0.5): got {args.label_smoothing}")
    common.seed_everything(args.seed)
    common.check_output_dir(args, "dpo.py")
    device, autocast, use_compile = common.device_and_autocast(args.bf16, args.compile)
    run_name, log, history = common.start_tracking(args, "dpo")
    ref_name = args.ref_model_name_or_path or args.model_name_or_path

    # ---- data and models --------------------------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    train_rows, eval_rows, _ = common.load_splits(args.dataset_name, [["prompt", "chosen", "rejected"]], seed=args.seed)
    train = common.tokenize_pairs(tok, train_rows, args.max_length)
    evals = common.tokenize_pairs(tok, eval_rows, args.max_length)
    _, prompt_rows, _ = common.load_splits(args.eval_prompts_name, [["prompt"]], seed=args.seed)
    eval_prompts, _ = common.encode_prompts(tok, prompt_rows[:args.num_eval_prompts],
                                            args.max_length - args.max_new_tokens, "eval")
    policy = common.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    needs_ref = args.loss_type != "simpo"
    ref_dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32

    def load_ref():
        return common.load_model(AutoModelForCausalLM, ref_name, tok, device, ref_dtype).eval().requires_grad_(False)

    micro = min(args.micro_batch_size, args.batch_size)

    @torch.inference_mode()
    def ref_logps_of(pairs, model):
        """(chosen, rejected) reference log-probs of every pair, in batches."""
        out = []
        for i in range(0, len(pairs), micro):  # training's batch shape: no larger peak memory than training's
            with autocast:
                out.append(torch.stack(pair_logps(model, pairs[i:i + micro], tok.pad_token_id, device)[:2], 1).float())
        return torch.cat(out)

    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        common.fail(f"{len(train)} training pairs is fewer than one batch of {args.batch_size}")
    total_steps = math.ceil(args.num_epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if total_steps * args.batch_size < len(train):  # a capped run sees only some pairs: keep just those
        keep = np.random.default_rng(args.seed).permutation(len(train))[:total_steps * args.batch_size]
        train = [train[i] for i in sorted(keep)]
    ref_model = None
    if needs_ref and args.precompute_ref_logps:  # once, with the reference in eval mode (no dropout)
        ref_model = load_ref()
        train_ref_logps, eval_ref_logps = ref_logps_of(train, ref_model), ref_logps_of(evals, ref_model)
        ref_model = None  # freed: only the policy stays in memory while training
        print(f"reference log-probs precomputed for {len(train)} train and {len(evals)} eval pairs")
    elif needs_ref:
        ref_model = load_ref()
    forward_policy = torch.compile(policy) if use_compile else policy

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, total_steps // 10), total_steps)

    def loss_on(pairs, indices, ref_table):
        """Per-pair losses and implicit rewards for a micro-batch, under the policy's current weights."""
        if not needs_ref:
            ref_chosen = ref_rejected = torch.zeros(len(pairs), device=device)
        elif ref_model is None:
            ref_chosen, ref_rejected = ref_table[indices].unbind(1)
        else:  # before the policy's forward, so its logits are gone when the policy's activations are alive
            with torch.inference_mode():
                ref_chosen, ref_rejected = (x.float() for x in pair_logps(ref_model, pairs, tok.pad_token_id, device)[:2])
        chosen, rejected, chosen_len, rejected_len = pair_logps(forward_policy, pairs, tok.pad_token_id, device)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, args.loss_type,
                        args.beta, args.label_smoothing, args.simpo_gamma, args.rpo_alpha)

    @torch.inference_mode()
    def evaluate_pairs():
        """Held-out preference metrics: does the implicit reward order the pairs as the labels do?"""
        stats = []
        for i in range(0, len(evals), micro):
            with autocast:
                losses, rc, rr = loss_on(evals[i:i + micro], torch.arange(i, min(i + micro, len(evals))),
                                         eval_ref_logps if needs_ref and args.precompute_ref_logps else None)
            stats.append(torch.stack([losses, rc, rr, (rc > rr).float()], 1))
        loss, rc, rr, acc = torch.cat(stats).mean(0).tolist()
        return {"loss": loss, "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
                "rewards/accuracies": acc}

    # ---- training ---------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r, *_ in train]
    batches, step, elapsed = [], 0, 0.0
    if args.resume:
        state = common.load_checkpoint(args.output_dir, {"policy": policy}, optimizer, scheduler)
        step, batches, elapsed, history[:] = state["step"], state["batches"], state["elapsed"], state["history"]
        rng.bit_generator.state = state["numpy_rng"]
    start = time.time() - elapsed
    policy.eval()  # dropout off, as when the reference log-probs were computed: gradients flow all the same
    progress = tqdm(total=total_steps, initial=step, desc="dpo", mininterval=5)
    while step < total_steps:
        if not batches:  # a new epoch: shuffled batches of pairs of similar length
            batches = [[int(i) for i in b] for b in common.length_grouped_batches(lengths, args.batch_size, rng)
                       if len(b) == args.batch_size]
        indices = batches.pop()
        stats = []
        for m in range(0, len(indices), micro):
            part = indices[m:m + micro]
            with autocast:
                losses, chosen_rewards, rejected_rewards = loss_on(
                    [train[i] for i in part], torch.tensor(part), train_ref_logps if needs_ref and args.precompute_ref_logps else None)
            (losses.sum() / len(indices)).backward()
            stats.append(torch.stack([losses.detach(), chosen_rewards, rejected_rewards,
                                      (chosen_rewards > rejected_rewards).float()], 1))
        step += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if common.finite_or_stop(torch.cat(stats)[:, 0].sum() + grad_norm, "loss", step, args.skip_nonfinite):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update()
        if step % 20 == 0 or step == total_steps:
            loss, rc, rr, acc = torch.cat(stats).mean(0).tolist()
            progress.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
            log({"train/loss": loss, "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
                 "rewards/accuracies": acc, "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0]}, step)
        if step % args.eval_every == 0 and step < total_steps:
            metrics = evaluate_pairs()
            tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            log({f"eval/{k}": v for k, v in metrics.items()}, step)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            common.save_checkpoint(args.output_dir, "dpo.py", args, {"policy": policy}, optimizer, scheduler,
                                   {"step": step, "batches": batches, "numpy_rng": rng.bit_generator.state,
                                    "elapsed": time.time() - start, "history": history})
    progress.close()
    train_seconds = time.time() - start

    # ---- evaluation: held-out pairs, then samples from the policy against the reference -------------
    pair_metrics = evaluate_pairs()
    ref_model = ref_model or load_ref()
    metrics, samples = common.evaluate(policy, tok, eval_prompts, args.max_new_tokens, args.temperature, 64,
                                       autocast, ref=ref_model, gold=args.gold_eval)
    results = {**metrics, "implicit_reward_accuracy": pair_metrics["rewards/accuracies"],
               **{f"eval_{k}": v for k, v in pair_metrics.items()}, "steps": step,
               "train_seconds": round(train_seconds, 1)}
    print(json.dumps(results, indent=2))
    for s in samples[:4]:
        print(f"  {s['prompt']} ->{s['response']}" + (f"   [gold {s['gold']}]" if "gold" in s else ""))
    log({f"eval/{k}": v for k, v in results.items()}, step)

    # ---- saving -----------------------------------------------------------------------------------
    def write(tmp):
        policy.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
        common.write_jsonl(os.path.join(tmp, "samples.jsonl"), samples)
        common.write_jsonl(os.path.join(tmp, "metrics.jsonl"), history)

    common.save_atomic(args.output_dir, "dpo.py", args, write)
    print(f"saved {args.output_dir}")
