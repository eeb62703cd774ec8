"""Kahneman-Tversky optimisation: learn a policy from thumbs up and down on single responses, with no pairs, no
reward model and no RL.

    python kto.py                               # the offline world: from runs/sft, on data/world/binary
    python kto.py --desirable_weight 5          # when thumbs up are a fifth of the thumbs down

KTO (Ethayarajh et al. 2024, eq. 7-8) learns from {prompt, completion, label} rows (label true: desirable, TRL's
unpaired format). With the log-ratio r = log pi(y|x) - log pi_ref(y|x), summed over the completion's tokens, and a
reference point z0, each row loses

    desirable    desirable_weight * (1 - sigmoid(beta * (r - z0)))
    undesirable  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

so a desirable response is pushed above the reference point and an undesirable one below it, each with a
gradient that vanishes once it is far on its side (the loss saturates, as prospect theory's value function does).
z0 estimates KL(pi || pi_ref): the mean log-ratio of mismatched pairs, each prompt of the step's batch with the
next row's completion, clamped at 0 and without gradient (under torchrun over the whole batch of every rank). The
paper recommends weights with desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3];
outside it, a note says which weights would be. `beta * r` is the implicit reward, as in dpo.py.

The reference log-probs of every row, and of every step's mismatched pairs, are computed once before training (the
steps' batches are drawn first), so only the policy is in memory while training; the reference is loaded again to
evaluate against it. Detail 32 of docs/implementation_details.md; the steps below are numbered as its "kto.py"
list. Evaluation and outputs are dpo.py's.
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
    beta: float = 0.1
    """strength of the KL constraint: the implicit reward is beta * log(pi / pi_ref)"""
    desirable_weight: float = 1.0
    """weight of a desirable row's loss"""
    undesirable_weight: float = 1.0
    """weight of an undesirable row's loss"""
    learning_rate: float = 2e-5
    """peak AdamW learning rate (~5e-7 to 5e-6 for a real model)"""
    num_epochs: float = 1.0
    """passes over the training rows"""
    max_steps: int | None = None
    """stop after this many steps (a cap for quick runs; the schedule follows it)"""
    batch_size: int = 32
    """rows per step (one optimizer step), at least 2 (z0 pairs each prompt with another row's completion); under
    torchrun the global batch, split over the processes"""
    micro_batch_size: int = 32
    """rows per forward/backward pass of one process, in training and evaluation"""
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
    dataset_name: str = "data/world/binary"
    """responses with thumbs {prompt, completion, label} (label a boolean, true for a thumbs up; text or chat
    messages): hub id, directory or .json/.jsonl"""
    max_length: int = 256
    """longest prompt + response in tokens; longer rows are dropped (counted)"""
    # ---- evaluation ----
    eval_every: int = 100
    """steps between evaluations of the held-out rows"""
    num_eval_rows: int | None = 256
    """held-out rows evaluated, every eval_every steps and at the end (the first of the eval split; None: all); the
    reference scores them once"""
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
    output_dir: str = "runs/kto"
    """where the policy, tokenizer and eval.json are written (atomically)"""
    seed: int = 1
    """seed of the data order and sampling"""
    save_every: int = 0
    """write a checkpoint (policy, optimizer, scheduler, RNG, step) every this many steps; 0: never"""
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


def kto_loss(logps, ref_logps, desirable, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-row losses and implicit rewards beta * (log pi - log pi_ref) of KTO (Ethayarajh et al. 2024, eq. 7;
    detail 32). Log-probs are sums over each completion's tokens; `desirable` is a boolean per row; z0 is the
    reference point, a number without gradient."""
    ratios = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratios - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratios))),
    )
    return losses, beta * ratios.detach()


def mismatched(rows: list[common.Unpaired], positions) -> tuple[list, list]:
    """(prompts, completions) of the mismatched pairs at `positions` of `rows`: each row's prompt with the next row's
    completion, the last row's with the first's (the rows' completions rotated by one, as TRL pairs them)."""
    return [rows[k].prompt for k in positions], [rows[(k + 1) % len(rows)].completion for k in positions]


def reference_point(mismatched_ratios, batch_size: int):
    """z0 (Ethayarajh et al. 2024, section 4.1): the mean log-ratio log pi(y'|x) - log pi_ref(y'|x) of the batch's
    mismatched pairs (this rank's share summed over the ranks, divided by the whole batch's size), an estimate of
    KL(pi || pi_ref), clamped at 0 and without gradient."""
    return (common.reduce_sum(mismatched_ratios.detach().sum()) / batch_size).clamp(min=0)


def row_stats(losses, rewards, desirable):
    """(B, 5) per row: the loss, and the implicit reward and count of desirable and of undesirable rows; summed over
    rows they give the metrics (kto_metrics)."""
    d = desirable.to(rewards.dtype)
    return torch.stack([losses.detach(), rewards * d, d, rewards * (1 - d), 1 - d], 1)


def kto_metrics(sums, n: int, z0) -> dict:
    """The mean loss of n rows, the mean implicit reward of their desirable and undesirable rows (where there are
    some) and its margin, and z0 (kl), from their row_stats summed."""
    loss, desirable, n_desirable, undesirable, n_undesirable = sums.tolist()
    metrics = {"loss": loss / n}
    if n_desirable:
        metrics["rewards/desirable"] = desirable / n_desirable
    if n_undesirable:
        metrics["rewards/undesirable"] = undesirable / n_undesirable
    if n_desirable and n_undesirable:
        metrics["rewards/margins"] = metrics["rewards/desirable"] - metrics["rewards/undesirable"]
    return {**metrics, "kl": float(z0)}


if __name__ == "__main__":
    # ---- TRY NOT TO MODIFY: arguments, seeding, device ------------------------------------------------
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "lora_alpha max_steps batch_size micro_batch_size adam_eps max_grad_norm log_every eval_every "
            "num_eval_prompts max_new_tokens eval_temperature eval_batch_size num_epochs max_length beta num_eval_rows "
            "desirable_weight undesirable_weight",
            "[0, inf)": "lora_r learning_rate weight_decay save_every warmup_steps",
            "[0, 1)": "lora_dropout adam_betas",
            "[0, 1]": "max_warmup_fraction",
            "(-inf, inf)": "seed",
        },
    )
    if args.batch_size < 2:  # one row's "mismatched" pair would be itself: z0 would be the row's own log-ratio
        plumbing.fail("--batch_size must be at least 2: z0 pairs each prompt with another row's completion")
    plumbing.check_global_batch(args.batch_size)
    plumbing.seed_everything(args.seed)
    plumbing.check_output_dir(args, "kto.py")
    gold_scorer = plumbing.load_function(args.gold_scorer, "gold_scorer")
    device, autocast, use_compile, bf16 = plumbing.device_and_autocast(args.bf16, args.compile)
    log, history = plumbing.start_tracking(args, "kto")
    ref_name = args.ref_model_name_or_path or args.model_name_or_path

    # ---- 1. data and models -------------------------------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    columns = ["prompt", "completion", "label"]
    train_rows, eval_rows, _ = common.load_splits(args.dataset_name, [columns], seed=args.seed)

    def tokenize(rows):
        """The rows' responses, each label a boolean (one line otherwise)."""
        is_bool, what = (lambda v: isinstance(v, bool)), "a boolean (true for a thumbs up, false for down)"
        return common.tokenize_unpaired(tok, rows, "label", args.max_length, is_bool, what)

    train, evals = tokenize(train_rows), tokenize(eval_rows[: args.num_eval_rows])
    if len(evals) < 2:
        plumbing.fail(f"{len(evals)} held-out row: z0 pairs each prompt with another row's completion (at least 2)")
    n_desirable = sum(x.value == 1 for x in train)
    n_undesirable = len(train) - n_desirable
    # Ethayarajh et al. 2024, eq. 8. A note, not an error: their recommendation from experiments, not a condition of
    # the loss, and a run may weight otherwise on purpose
    weighted = args.desirable_weight * n_desirable, args.undesirable_weight * n_undesirable
    ratio = weighted[0] / weighted[1] if weighted[1] else math.inf
    if not 1 <= ratio <= 4 / 3:
        low = args.undesirable_weight * n_undesirable / max(n_desirable, 1)
        print(
            f"note: {n_desirable} desirable and {n_undesirable} undesirable rows: desirable_weight x n_desirable / "
            f"(undesirable_weight x n_undesirable) = {ratio:.3g}, outside the paper's [1, 4/3]; --desirable_weight "
            f"{low:.3g} to {4 / 3 * low:.3g} would be in it"
        )
    _, prompt_rows, _ = common.load_splits(args.eval_prompts_name, [["prompt"]], seed=args.seed)
    max_prompt_length = args.max_length - args.max_new_tokens
    eval_prompts, kept = common.encode_prompts(tok, prompt_rows[: args.num_eval_prompts], max_prompt_length, "eval")
    probe = common.bind_probe(plumbing.load_function(args.probe, "probe"), [prompt_rows[i] for i in kept])
    policy = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    policy = plumbing.shard_model(common.add_lora(policy, args, bf16=bf16))  # --lora_r: adapters, the rest frozen

    def load_ref():
        """The frozen reference, in the policy's dtype: at step 0 the implicit rewards are 0 (detail 26). With LoRA
        the policy itself with its adapters off (detail 30), unless another reference is named."""
        if args.lora_r and not args.ref_model_name_or_path:
            return common.WithoutAdapters(policy)
        ref = plumbing.load_model(AutoModelForCausalLM, ref_name, tok, device)
        return plumbing.shard_model(ref.eval().requires_grad_(False))  # eval(): no dropout, as the policy's (below)

    micro = min(args.micro_batch_size, args.batch_size)
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        plumbing.fail(f"{len(train)} training rows is fewer than one batch of {args.batch_size}")
    total_steps = math.ceil(args.num_epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    # every step's rows, drawn now (epochs of shuffled batches of similar length) so that the reference can score
    # each step's mismatched pairs before training; a resumed run draws the same
    rng = np.random.default_rng(args.seed)
    lengths = [len(x.prompt) + len(x.completion) for x in train]
    schedule = []
    while len(schedule) < total_steps:
        grouped = common.length_grouped_batches(lengths, args.batch_size, rng)
        schedule += [[int(i) for i in b] for b in grouped if len(b) == args.batch_size]
    schedule = schedule[:total_steps]

    # ---- ALGO LOGIC: 2. the reference's log-probs, computed once (detail 19) ---------------------------------
    def logps_of(model, prompts, completions):
        """Summed log-probs of each completion given its prompt, in fp32."""
        return common.completion_logps(model, prompts, completions, tok.pad_token_id, device)[0].float()

    @torch.inference_mode()
    def ref_logps_of(model, prompts, completions):
        """The reference's log-probs of every (prompt, completion): (N,); each rank computes its share."""
        local, out = common.shard(range(len(prompts))), []
        for i in tqdm(range(0, len(local), micro), "reference log-probs", mininterval=5, leave=False):
            part = local[i : i + micro]  # training's micro-batch shape: no larger peak memory than training's
            with autocast:
                out += logps_of(model, [prompts[k] for k in part], [completions[k] for k in part]).tolist()
        return torch.tensor(common.gather(out)[: len(prompts)], device=device)

    ref_model = load_ref()
    used = sorted({i for rows in schedule for i in rows})  # a capped run scores only the rows it uses
    train_ref_logps = torch.full((len(train),), torch.nan, device=device)
    train_ref_logps[used] = ref_logps_of(
        ref_model, [train[i].prompt for i in used], [train[i].completion for i in used]
    )
    pairs = [mismatched([train[i] for i in rows], range(len(rows))) for rows in schedule]  # each step's, in order
    prompts, completions = [p for ps, _ in pairs for p in ps], [c for _, cs in pairs for c in cs]
    mismatched_ref_logps = ref_logps_of(ref_model, prompts, completions).view(total_steps, args.batch_size)
    eval_ref_logps = ref_logps_of(ref_model, [x.prompt for x in evals], [x.completion for x in evals])
    eval_mismatched_ref_logps = ref_logps_of(ref_model, *mismatched(evals, range(len(evals))))
    ref_model = None  # freed: only the policy stays in memory while training
    print(
        f"reference log-probs precomputed for {len(used)} train rows, {len(prompts)} mismatched pairs and "
        f"{len(evals)} eval rows"
    )
    common.seed_sampling(args.seed)
    forward_policy = torch.compile(policy) if use_compile else policy
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    trained = [p for p in policy.parameters() if p.requires_grad]  # what is frozen is not in the optimizer
    optimizer = torch.optim.AdamW(trained, **adamw, fused=True)
    warmup = min(args.warmup_steps, int(total_steps * args.max_warmup_fraction))
    scheduler = common.warmup_cosine_schedule(optimizer, warmup, total_steps)

    @torch.inference_mode()
    def evaluate_rows():
        """5. Held-out KTO metrics: the loss of every held-out row against the held-out set's own z0 (each of its
        prompts with the next row's completion)."""
        local, out = common.shard(range(len(evals))), []  # each rank its share of the rows
        for i in range(0, len(local), micro):
            part = local[i : i + micro]
            with autocast:
                matched = logps_of(forward_policy, [evals[k].prompt for k in part], [evals[k].completion for k in part])
                other = logps_of(forward_policy, *mismatched(evals, part))
            out += torch.stack([matched, other], 1).tolist()
        logps, mismatched_logps = torch.tensor(common.gather(out)[: len(evals)], device=device).unbind(1)
        z0 = (mismatched_logps - eval_mismatched_ref_logps).mean().clamp(min=0)
        desirable = torch.tensor([x.value == 1 for x in evals], device=device)
        losses, rewards = kto_loss(logps, eval_ref_logps, desirable, z0, **coefs)
        return kto_metrics(row_stats(losses, rewards, desirable).sum(0), len(evals), z0)

    coefs = dict(beta=args.beta, desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
    step, elapsed = 0, 0.0
    if args.resume:
        state = plumbing.load_checkpoint(args.output_dir, {"policy": policy}, optimizer, scheduler)
        step, elapsed, history[:] = state["step"], state["elapsed"], state["history"]
    start = time.time() - elapsed
    policy.eval()  # dropout off, as when the reference log-probs were computed: gradients flow all the same
    progress = tqdm(total=total_steps, initial=step, desc="kto", mininterval=5)
    while step < total_steps:
        rows = [train[i] for i in schedule[step]]
        local = common.shard(range(len(rows)))  # under torchrun each rank takes its share of the batch's positions
        # 3. z0: the log-ratios of the batch's mismatched pairs, under the policy before this step's update
        with torch.no_grad(), autocast:
            parts = [local[m : m + micro] for m in range(0, len(local), micro)]
            ratios = [
                logps_of(forward_policy, *mismatched(rows, part)) - mismatched_ref_logps[step, part] for part in parts
            ]
        z0 = reference_point(torch.cat(ratios), len(rows))
        # 4. the loss of each row against z0, desirable and undesirable weighted
        stats = []
        for m in range(0, len(local), micro):
            part = local[m : m + micro]
            with autocast:
                logps = logps_of(forward_policy, [rows[k].prompt for k in part], [rows[k].completion for k in part])
            desirable = torch.tensor([rows[k].value == 1 for k in part], device=device)
            ref_logps = train_ref_logps[[schedule[step][k] for k in part]]
            losses, rewards = kto_loss(logps, ref_logps, desirable, z0, **coefs)
            (losses.sum() / len(rows)).backward()  # divided by the whole batch's size: ranks' gradients add up
            stats.append(row_stats(losses, rewards, desirable))
        stats = common.reduce_sum(torch.cat(stats).sum(0))  # the batch's sums
        step += 1
        grad_norm = common.clip_grad_norm(trained, args.max_grad_norm)
        if plumbing.finite_or_stop(stats[0] + grad_norm, "loss", step, args.skip_nonfinite):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update()

        # ---- TRY NOT TO MODIFY: logging, periodic evaluation, checkpoints ---------------------------------
        if step % args.log_every == 0 or step == total_steps:
            metrics = kto_metrics(stats, len(rows), z0)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", kl=f"{metrics['kl']:.3f}")
            metrics["train/loss"] = metrics.pop("loss")
            log({**metrics, "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0]}, step)
        if step % args.eval_every == 0 and step < total_steps:
            metrics = evaluate_rows()
            tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            log({f"eval/{k}": v for k, v in metrics.items()}, step)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            state = {"step": step, "elapsed": time.time() - start, "history": history}
            plumbing.save_checkpoint(args.output_dir, "kto.py", args, {"policy": policy}, optimizer, scheduler, state)
    progress.close()
    train_seconds = time.time() - start

    # ---- 5. evaluation: held-out rows, then samples from the policy against the reference -------------------
    row_results = evaluate_rows()
    ref_model = load_ref()
    metrics, samples = common.evaluate(
        policy, tok, eval_prompts, args, autocast, ref=ref_model, gold_scorer=gold_scorer, probe=probe
    )
    results = {**metrics, **row_results, "steps": step, "train_seconds": round(train_seconds, 1)}
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

    plumbing.write_atomic(args.output_dir, "kto.py", args, write)
    print(f"saved {args.output_dir}")
