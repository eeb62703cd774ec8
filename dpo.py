"""Direct preference optimisation: learn from preference pairs without a reward model or RL.

    python dpo.py                               # the offline world: from runs/sft, on data/world/preference
    python dpo.py --loss_type ipo --beta 0.1    # or cdpo, hinge, simpo; --rpo_alpha 1 adds NLL on chosen

DPO (Rafailov et al. 2023, eq. 7) fits the policy whose implicit reward beta * log(pi / pi_ref) explains the
preferences under Bradley-Terry. With h = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)]:

    sigmoid  -log sigmoid(beta * h)                                     DPO
    cdpo     -(1 - e) log sigmoid(beta * h) - e log sigmoid(-beta * h)  conservative DPO (label smoothing e)
    ipo      (h - 1 / (2 * beta))^2, with per-token average log-probs   IPO (Azar et al. 2023, eq. 17)
    hinge    relu(1 - beta * h)                                         SLiC (Zhao et al. 2023)
    simpo    -log sigmoid(beta * h' - gamma), h' the difference of per-token average log-probs of the
             policy alone: no reference model                           SimPO (Meng et al. 2024, eq. 6)

and --rpo_alpha adds alpha * (per-token NLL of the chosen response) (RPO, Pang et al. 2024). The reference
log-probs are computed once before training (--precompute_ref_logps, on by default), so only the policy is
in memory while training; the reference is loaded again to evaluate against it. Details 18-19 of
docs/implementation_details.md; the steps below are numbered as its "dpo.py" list.
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
from transformers import AutoModelForCausalLM

import common
import plumbing


@dataclass
class Args:
    # ---- algorithm ----
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
    learning_rate: float = 2e-5
    """peak AdamW learning rate (~5e-7 to 1e-6 for a real model)"""
    num_epochs: float = 1.0
    """passes over the training pairs"""
    max_steps: int | None = None
    """stop after this many steps (a cap for quick runs; the schedule follows it)"""
    batch_size: int = 32
    """pairs per step (one optimizer step); under torchrun the global batch, split over the processes"""
    micro_batch_size: int = 32
    """pairs per forward/backward pass of one process (2x sequences), in training and evaluation"""
    warmup_steps: int = 20
    """linear warmup steps, then cosine decay to 0"""
    max_warmup_fraction: float = 0.1
    """the warmup takes at most this share of all steps (short runs)"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (torch's defaults, as the reference implementations use them)"""
    adam_eps: float = 1e-5
    """AdamW epsilon (detail 15)"""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default)"""
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
    model_name_or_path: str = "runs/sft"
    """the SFT model: the policy starts from it and, unless --ref_model_name_or_path, is the reference"""
    ref_model_name_or_path: str | None = None
    """a different reference model (defaults to model_name_or_path)"""
    dataset_name: str = "data/world/preference"
    """preference pairs {prompt, chosen, rejected} (text or chat messages): hub id, directory or .json/.jsonl"""
    max_length: int = 256
    """longest prompt + response in tokens; longer pairs are dropped (counted)"""
    # ---- evaluation ----
    eval_every: int = 100
    """steps between evaluations of the held-out pairs"""
    num_eval_rows: int | None = 256
    """held-out pairs evaluated, every eval_every steps and at the end (the first of the eval split; None: all);
    the reference scores them once"""
    eval_prompts_name: str = "data/world/prompts"
    """prompts whose held-out split the policy and the reference are sampled on at the end"""
    num_eval_prompts: int = 256
    """held-out prompts sampled from the policy and the reference at the end"""
    max_new_tokens: int = 64
    """longest evaluation sample in tokens"""
    eval_temperature: float = 0.7
    """sampling temperature of the evaluation samples (the same in dpo.py, ppo.py and rlaif.py)"""
    eval_batch_size: int = 64
    """prompts sampled at once in evaluation"""
    gold_scorer: str | None = "data.gold:score"
    """the task's true score of samples, "module:function" taking (prompts, responses) and returning one score
    each; the offline world's gold rater by default; None turns it off"""
    probe: str | None = "data.sycophancy:probe"
    """held-out metrics of the eval prompts' own fields, "module:function" (rows, responses) -> metrics:
    by default the world's sycophancy probe, which reports nothing for prompts without its fields; None: off"""
    log_every: int = 20
    """steps between logged training metrics"""
    # ---- run ----
    output_dir: str = "runs/dpo"
    """where the policy, tokenizer and eval.json are written (atomically)"""
    seed: int = 1
    """seed of the data order and sampling"""
    save_every: int = 0
    """write a checkpoint (policy, optimizer, scheduler, RNG, data position) every this many steps; 0: never"""
    resume: bool = False
    """continue from the checkpoint in --output_dir"""
    skip_nonfinite: bool = False
    """skip a batch whose loss is not finite instead of stopping"""
    bf16: bool | None = None
    """bf16 autocast (--bf16 True/False); by default on with CUDA, off on the CPU"""
    compile: bool | None = None
    """torch.compile the policy's training forward (--compile True/False); by default on with CUDA, off on the CPU"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf-reference"
    """wandb project name"""


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing=0.0,
    simpo_gamma=0.5,
    rpo_alpha=0.0,
):
    """Per-pair losses and the implicit rewards (chosen_rewards, rejected_rewards) of the DPO family (detail 18).
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


def pair_logps(model, pairs: list[common.Pair], pad_id, device):
    """Summed log-probs and lengths of chosen and rejected responses, in one forward of 2B sequences:
    (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)."""
    prompts = [x.prompt for x in pairs] * 2
    responses = [x.chosen for x in pairs] + [x.rejected for x in pairs]
    logps, lengths = common.completion_logps(model, prompts, responses, pad_id, device)
    n = len(pairs)
    return logps[:n], logps[n:], lengths[:n], lengths[n:]


def pair_stats(losses, chosen_rewards, rejected_rewards):
    """(B, 5) per-pair loss and implicit-reward statistics; their means are the logged metrics (PAIR_STATS)."""
    accuracies = (chosen_rewards > rejected_rewards) + 0.5 * (chosen_rewards == rejected_rewards)
    return torch.stack(
        [losses.detach(), chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards, accuracies], 1
    )


PAIR_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


if __name__ == "__main__":
    # ---- TRY NOT TO MODIFY: arguments, seeding, device ------------------------------------------------
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "lora_alpha max_steps batch_size micro_batch_size adam_eps max_grad_norm log_every eval_every "
            "num_eval_prompts max_new_tokens eval_temperature eval_batch_size num_epochs max_length "
            "beta num_eval_rows",
            "[0, inf)": "lora_r learning_rate weight_decay save_every warmup_steps simpo_gamma rpo_alpha",
            "[0, 1)": "lora_dropout adam_betas",
            "[0, 1]": "max_warmup_fraction",
            "[0, 0.5)": "label_smoothing",
            "(-inf, inf)": "seed",
        },
    )
    plumbing.check_global_batch(args.batch_size)
    plumbing.seed_everything(args.seed)
    plumbing.check_output_dir(args, "dpo.py")
    gold_scorer = plumbing.load_function(args.gold_scorer, "gold_scorer")
    device, autocast, use_compile, bf16 = plumbing.device_and_autocast(args.bf16, args.compile)
    log, history = plumbing.start_tracking(args, "dpo")
    ref_name = args.ref_model_name_or_path or args.model_name_or_path

    # ---- 1. data and models -------------------------------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    train_rows, eval_rows, _ = common.load_splits(args.dataset_name, [["prompt", "chosen", "rejected"]], seed=args.seed)
    train = common.tokenize_pairs(tok, train_rows, args.max_length)
    evals = common.tokenize_pairs(tok, eval_rows[: args.num_eval_rows], args.max_length)
    _, prompt_rows, _ = common.load_splits(args.eval_prompts_name, [["prompt"]], seed=args.seed)
    max_prompt_length = args.max_length - args.max_new_tokens
    eval_prompts, kept = common.encode_prompts(tok, prompt_rows[: args.num_eval_prompts], max_prompt_length, "eval")
    probe = common.bind_probe(plumbing.load_function(args.probe, "probe"), [prompt_rows[i] for i in kept])
    policy = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    policy = plumbing.shard_model(common.add_lora(policy, args, bf16=bf16))  # --lora_r: adapters, the rest frozen
    needs_ref = args.loss_type != "simpo"

    def load_ref():
        """The frozen reference, in the policy's dtype: at step 0 the implicit rewards are 0 (detail 26). With LoRA
        the policy itself with its adapters off, unless another reference is named."""
        if args.lora_r and not args.ref_model_name_or_path:
            return common.WithoutAdapters(policy)
        ref = plumbing.load_model(AutoModelForCausalLM, ref_name, tok, device)
        return plumbing.shard_model(ref.eval().requires_grad_(False))  # eval(): no dropout, as the policy's (below)

    micro = min(args.micro_batch_size, args.batch_size)
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        plumbing.fail(f"{len(train)} training pairs is fewer than one batch of {args.batch_size}")
    total_steps = math.ceil(args.num_epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if total_steps * args.batch_size < len(train):  # a capped run sees only some pairs: keep just those
        keep = np.random.default_rng(args.seed).permutation(len(train))[: total_steps * args.batch_size]
        train = [train[i] for i in sorted(keep)]

    # ---- ALGO LOGIC: 2. the reference's log-probs of every pair, computed once (detail 19) -------------------
    @torch.inference_mode()
    def ref_logps_of(pairs, model):
        """(chosen, rejected) reference log-probs of every pair: (N, 2); each rank computes its share."""
        local_pairs, out = common.shard(pairs), []
        for i in tqdm(range(0, len(local_pairs), micro), "reference log-probs", mininterval=5, leave=False):
            # training's micro-batch shape: no larger peak memory than training's
            with autocast:
                chosen, rejected, _, _ = pair_logps(model, local_pairs[i : i + micro], tok.pad_token_id, device)
            out += torch.stack([chosen, rejected], 1).tolist()
        return torch.tensor(common.gather(out)[: len(pairs)], device=device)

    ref_model, train_ref_logps, eval_ref_logps = None, None, None
    if needs_ref and args.precompute_ref_logps:
        ref_model = load_ref()
        train_ref_logps, eval_ref_logps = ref_logps_of(train, ref_model), ref_logps_of(evals, ref_model)
        ref_model = None  # freed: only the policy stays in memory while training
        print(f"reference log-probs precomputed for {len(train)} train and {len(evals)} eval pairs")
    elif needs_ref:
        ref_model = load_ref()
    common.seed_sampling(args.seed)
    forward_policy = torch.compile(policy) if use_compile else policy
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    trained = [p for p in policy.parameters() if p.requires_grad]  # what is frozen is not in the optimizer
    optimizer = torch.optim.AdamW(trained, **adamw, fused=True)
    warmup = min(args.warmup_steps, int(total_steps * args.max_warmup_fraction))
    scheduler = common.warmup_cosine_schedule(optimizer, warmup, total_steps)

    def loss_on(pairs, indices, ref_table):
        """3. Per-pair losses and implicit rewards for a micro-batch, under the policy's current weights."""
        if not needs_ref:
            ref_chosen = ref_rejected = torch.zeros(len(pairs), device=device)
        elif ref_model is None:
            ref_chosen, ref_rejected = ref_table[indices].unbind(1)
        else:  # before the policy's forward, so its logits are gone when the policy's activations are alive
            with torch.inference_mode():
                ref_chosen, ref_rejected, _, _ = pair_logps(ref_model, pairs, tok.pad_token_id, device)
            ref_chosen, ref_rejected = ref_chosen.float(), ref_rejected.float()
        chosen, rejected, chosen_lengths, rejected_lengths = pair_logps(forward_policy, pairs, tok.pad_token_id, device)
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            chosen_lengths,
            rejected_lengths,
            args.loss_type,
            args.beta,
            args.label_smoothing,
            args.simpo_gamma,
            args.rpo_alpha,
        )

    @torch.inference_mode()
    def evaluate_pairs():
        """4. Held-out preference metrics: does the implicit reward order the pairs as the labels do?"""
        local_indices, stats = common.shard(range(len(evals))), []  # each rank its share of the pairs
        for i in range(0, len(local_indices), micro):
            with autocast:
                indices = local_indices[i : i + micro]
                losses = loss_on([evals[j] for j in indices], torch.tensor(indices), eval_ref_logps)
            stats += pair_stats(*losses).tolist()
        stats = torch.tensor(common.gather(stats)[: len(evals)])
        return dict(zip(PAIR_STATS, stats.mean(0).tolist(), strict=True))

    rng = np.random.default_rng(args.seed)
    lengths = [len(x.prompt) + max(len(x.chosen), len(x.rejected)) for x in train]
    batches, step, elapsed = [], 0, 0.0
    if args.resume:
        state = plumbing.load_checkpoint(args.output_dir, {"policy": policy}, optimizer, scheduler)
        step, batches, elapsed, history[:] = state["step"], state["batches"], state["elapsed"], state["history"]
        rng.bit_generator.state = state["numpy_rng"]
    start = time.time() - elapsed
    policy.eval()  # dropout off, as when the reference log-probs were computed: gradients flow all the same
    progress = tqdm(total=total_steps, initial=step, desc="dpo", mininterval=5)
    while step < total_steps:
        if not batches:  # a new epoch: shuffled batches of pairs of similar length
            grouped = common.length_grouped_batches(lengths, args.batch_size, rng)
            batches = [[int(i) for i in b] for b in grouped if len(b) == args.batch_size]
        indices = batches.pop()
        local_indices, stats = common.shard(indices), []  # under torchrun each rank takes its share of the batch
        for m in range(0, len(local_indices), micro):
            part = local_indices[m : m + micro]
            with autocast:
                losses, chosen_rewards, rejected_rewards = loss_on(
                    [train[i] for i in part], torch.tensor(part), train_ref_logps
                )
            (losses.sum() / len(indices)).backward()  # divided by the whole batch's size: ranks' gradients add up
            stats.append(pair_stats(losses, chosen_rewards, rejected_rewards))
        stats = common.reduce_sum(torch.cat(stats).sum(0)) / len(indices)  # the batch's mean statistics
        step += 1
        grad_norm = common.clip_grad_norm(trained, args.max_grad_norm)
        if plumbing.finite_or_stop(stats[0] + grad_norm, "loss", step, args.skip_nonfinite):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update()

        # ---- TRY NOT TO MODIFY: logging, periodic evaluation, checkpoints ---------------------------------
        if step % args.log_every == 0 or step == total_steps:
            metrics = dict(zip(PAIR_STATS, stats.tolist(), strict=True))
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            metrics["train/loss"] = metrics.pop("loss")
            log({**metrics, "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0]}, step)
        if step % args.eval_every == 0 and step < total_steps:
            metrics = evaluate_pairs()
            tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            log({f"eval/{k}": v for k, v in metrics.items()}, step)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            state = {
                "step": step,
                "batches": batches,
                "numpy_rng": rng.bit_generator.state,
                "elapsed": time.time() - start,
                "history": history,
            }
            plumbing.save_checkpoint(args.output_dir, "dpo.py", args, {"policy": policy}, optimizer, scheduler, state)
    progress.close()
    train_seconds = time.time() - start

    # ---- 4. evaluation: held-out pairs, then samples from the policy against the reference ---------------
    pair_results = evaluate_pairs()
    ref_model = ref_model or load_ref()
    metrics, samples = common.evaluate(
        policy, tok, eval_prompts, args, autocast, ref=ref_model, gold_scorer=gold_scorer, probe=probe
    )
    results = {**metrics, **pair_results, "steps": step, "train_seconds": round(train_seconds, 1)}
    print(json.dumps(results, indent=2))
    for s in samples[:4]:
        print(f"  {s['prompt']} ->{s['response']}" + (f"   [gold {s['gold']}]" if "gold" in s else ""))
    log({f"eval/{k}": v for k, v in results.items()}, step)

    # ---- TRY NOT TO MODIFY: saving ---------------------------------------------------------------------------
    weights = plumbing.full_state_dict(policy)  # under torchrun gathered from the shards; None in one process

    def write(tmp):
        plumbing.save_model(policy, tmp, weights)
        tok.save_pretrained(tmp)
        plumbing.write_json(os.path.join(tmp, "eval.json"), results)
        plumbing.write_jsonl(os.path.join(tmp, "samples.jsonl"), samples)
        plumbing.write_jsonl(os.path.join(tmp, "metrics.jsonl"), history)

    plumbing.write_atomic(args.output_dir, "dpo.py", args, write)
    print(f"saved {args.output_dir}")
