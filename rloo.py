"""Critic-free RLHF against a reward model: REINFORCE with a leave-one-out baseline (RLOO), or GRPO.

    python rloo.py                              # the offline world: runs/sft against runs/reward, RLOO, k = 4
    python rloo.py --baseline grpo --output_dir runs/grpo

PPO learns a value model to tell a good response from a lucky one. These estimators instead sample k
responses per prompt and let the others be the baseline (detail 17 of docs/implementation_details.md): no
value model, one model fewer to train and keep in memory. Each response y_i of a prompt gets one scalar
score s_i from the reward model (responses without EOS score `missing_eos_score`: the EOS trick, detail 10):

  --baseline rloo   r_i = s_i - kl_coef * KL_i, with KL_i = sum_t log pi(y_t) - log pi_ref(y_t) the
                    sequence's KL (k1), and A_i = r_i - mean_{j != i} r_j (Ahmadian et al. 2024, "Back to
                    Basics"). The baseline never depends on y_i itself, so the gradient stays unbiased.
  --baseline grpo   A_i = (s_i - mean_j s_j) / (std_j s_j + eps) over the prompt's group (Shao et al. 2024,
                    DeepSeekMath, eq. 3), and the KL enters the loss, kl_coef * k3 per token with k3 =
                    (q - 1) - log q, q = pi_ref / pi (unbiased and never negative), not the reward.

The two differ in what a prompt's gradient weighs: RLOO's advantages keep the reward's scale, so a prompt
whose samples differ a lot moves the policy more; GRPO divides each group by its own spread, so every prompt
with any difference counts alike (and a group of equal scores gives exactly 0). GRPO keeps the KL out of
the advantage, so the group normalisation sees only the scores; RLOO, as PPO does, pays the KL as reward.

The loss is PPO's clipped importance-weighted surrogate over the response tokens (Schulman et al. 2017, eq.
7), averaged over the batch's real tokens as in ppo.py, for `num_ppo_epochs` passes of `num_mini_batches`
minibatches; one epoch of one minibatch makes the ratio 1 and the loss REINFORCE with that baseline. The
steps are numbered as docs/implementation_details.md's "rloo.py" list.
"""

import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import plumbing


@dataclass
class Args:
    # ---- algorithm ----
    baseline: Literal["rloo", "grpo"] = "rloo"
    """rloo: leave-one-out mean of the KL-penalised rewards; grpo: group-normalised scores, KL in the loss"""
    rloo_k: int = 4
    """responses sampled per prompt (k >= 2: a response's baseline is made of the others)"""
    total_episodes: int = 1024
    """episodes (prompts rolled out, each with rloo_k responses) in all; 1,024 x 4 = ppo.py's 4,096 responses"""
    max_steps: int | None = None
    """stop after this many steps (rollout batches); the learning-rate schedule follows it"""
    batch_size: int = 16
    """episodes (prompts) per step: batch_size * rloo_k responses, learnt from in num_ppo_epochs x
    num_mini_batches optimizer steps; under torchrun the global batch, split over the processes"""
    num_mini_batches: int = 1
    """minibatches (optimizer steps) per epoch"""
    micro_batch_size: int = 16
    """episodes per forward/backward pass of one process (micro_batch_size x rloo_k responses; gradient
    accumulation)"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch (1 with one minibatch: plain REINFORCE)"""
    learning_rate: float = 3e-5
    """AdamW learning rate, annealed linearly to 0 (ppo.py's)"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (torch's defaults, as the reference implementations use them)"""
    adam_eps: float = 1e-5
    """AdamW epsilon (detail 15)"""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    response_length: int = 48
    """tokens sampled per rollout response (the EOS trick cuts after the first EOS)"""
    rollout_temperature: float = 0.7
    """sampling temperature of rollouts; their log-probs are computed at the same temperature (detail 3)"""
    missing_eos_score: float = -1.0
    """the score given to a response with no EOS in response_length tokens, instead of the reward model's"""
    kl_coef: float = 0.05
    """beta of the KL to the SFT policy: in the reward (rloo) or the loss (grpo)"""
    grpo_eps: float = 1e-4
    """grpo: added to the group's standard deviation (a group of equal scores gets advantage 0)"""
    cliprange: float = 0.2
    """PPO clip range of the probability ratio"""
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
    """the SFT policy: training starts from it, and it is the frozen reference of the KL"""
    reward_model_name_or_path: str = "runs/reward"
    """the reward model (a one-label sequence classifier, e.g. reward.py's output)"""
    dataset_name: str = "data/world/prompts"
    """prompts {prompt} (text or chat messages): the train split is rolled out, the held-out split evaluated"""
    max_prompt_length: int = 128
    """longest prompt in tokens; longer ones are dropped (counted)"""
    # ---- evaluation ----
    eval_every: int = 16
    """steps between evaluations on held-out prompts (appended to curve.jsonl)"""
    num_periodic_eval_prompts: int = 64
    """held-out prompts of the evaluations every eval_every steps (the first of the num_eval_prompts)"""
    num_eval_prompts: int = 256
    """held-out prompts of the final evaluation"""
    max_new_tokens: int = 48
    """longest evaluation sample in tokens"""
    eval_temperature: float = 0.7
    """sampling temperature of the evaluation samples (the same in dpo.py, ppo.py, rloo.py and rlaif.py)"""
    eval_batch_size: int = 64
    """prompts sampled at once in evaluation"""
    gold_scorer: str | None = "data.gold:score"
    """the task's true score of samples, "module:function" taking (prompts, responses) and returning one score
    each; the offline world's gold rater by default; None turns it off"""
    probe: str | None = "data.sycophancy:probe"
    """held-out metrics of the eval prompts' own fields, "module:function" (rows, responses) -> metrics:
    by default the world's sycophancy probe, which reports nothing for prompts without its fields; None: off"""
    log_every: int = 4
    """steps between logged training metrics"""
    log_samples_every: int = 16
    """steps between tables of sample responses (stdout, and wandb with --track)"""
    # ---- run ----
    output_dir: str = "runs/rloo"
    """where the policy and eval.json are written (atomically)"""
    seed: int = 1
    """seed of the data order, sampling and minibatch shuffling"""
    save_every: int = 0
    """write a checkpoint (policy, optimizer, RNG, data position) every this many steps; 0: never"""
    resume: bool = False
    """continue from the checkpoint in --output_dir"""
    skip_nonfinite: bool = False
    """skip a rollout batch whose scores or losses are not finite instead of stopping"""
    bf16: bool | None = None
    """bf16 autocast (--bf16 True/False); by default on with CUDA, off on the CPU"""
    compile: bool | None = None
    """torch.compile the training forward (--compile True/False); by default on with CUDA, off on the CPU"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf-reference"
    """wandb project name"""


def masked_mean(x, mask):
    """The mean over the real response tokens only."""
    return (x * mask).sum() / mask.sum()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, k) rewards of k responses per prompt -> A_i = r_i - mean of the other k - 1 (Ahmadian et al. 2024)."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(P, k) scores -> (s_i - mean) / (std + eps) within each prompt's group (Shao et al. 2024); the standard
    deviation is the sample one (k - 1 in the denominator), as TRL's GRPOTrainer computes it."""
    return (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + eps)


def kl_k3(logprobs, ref_logprobs):
    """Per-token k3 estimate of KL(pi || pi_ref) on tokens sampled from pi: (q - 1) - log q, q = pi_ref / pi."""
    log_q = ref_logprobs - logprobs
    return torch.expm1(log_q) - log_q


def policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange=0.2):
    """Clipped surrogate (Schulman et al. 2017, eq. 7) of per-response advantages over their tokens, averaged over
    the real tokens; with its clip fraction and approximate KL to the rollout policy."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    advantages = advantages[:, None]  # one advantage per response, for each of its tokens
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    clipfrac = masked_mean((pg_losses > -advantages * ratio).float(), mask)
    approxkl = 0.5 * masked_mean((new_logprobs - old_logprobs) ** 2, mask)
    return masked_mean(pg_losses, mask), clipfrac, approxkl


if __name__ == "__main__":
    # ---- TRY NOT TO MODIFY: arguments, seeding, device ------------------------------------------------
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "lora_alpha max_steps batch_size micro_batch_size adam_eps max_grad_norm log_every eval_every "
            "num_eval_prompts max_new_tokens eval_temperature eval_batch_size total_episodes "
            "num_mini_batches num_ppo_epochs response_length rollout_temperature cliprange "
            "max_prompt_length num_periodic_eval_prompts log_samples_every rloo_k grpo_eps",
            "[0, inf)": "lora_r learning_rate weight_decay save_every kl_coef",
            "[0, 1)": "lora_dropout adam_betas",
            "(-inf, inf)": "seed missing_eos_score",
        },
    )
    if args.rloo_k < 2:
        plumbing.fail(f"--rloo_k must be at least 2 (a response's baseline is made of the others), got {args.rloo_k}")
    prompts_per_minibatch = args.batch_size // args.num_mini_batches
    if args.batch_size % args.num_mini_batches or prompts_per_minibatch % (common.WORLD_SIZE * args.micro_batch_size):
        processes = f", over {common.WORLD_SIZE} processes," if common.WORLD_SIZE > 1 else ""
        plumbing.fail(
            f"batch_size {args.batch_size} must split into num_mini_batches {args.num_mini_batches} "
            f"minibatches of whole micro-batches of {args.micro_batch_size}{processes}"
        )
    prompts_per_minibatch = args.batch_size // args.num_mini_batches
    # the rollout batch's responses (under torchrun, this rank's share), shuffled into minibatches and
    # micro-batches of responses; minibatch_size counts the whole minibatch's
    n_responses, minibatch_size = (
        args.batch_size * args.rloo_k // common.WORLD_SIZE,
        prompts_per_minibatch * args.rloo_k,
    )
    share, micro_size = minibatch_size // common.WORLD_SIZE, args.micro_batch_size * args.rloo_k
    plumbing.seed_everything(args.seed)
    plumbing.check_output_dir(args, "rloo.py")
    gold_scorer = plumbing.load_function(args.gold_scorer, "gold_scorer")
    device, autocast, use_compile, bf16 = plumbing.device_and_autocast(args.bf16, args.compile, kernel_cache=32)
    log, history = plumbing.start_tracking(args, f"rloo_{args.baseline}")

    # ---- TRY NOT TO MODIFY: data and models -----------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    train_rows, eval_rows, _ = common.load_splits(args.dataset_name, [["prompt"]], seed=args.seed)
    prompts, _ = common.encode_prompts(tok, train_rows, args.max_prompt_length)
    eval_prompts, kept = common.encode_prompts(tok, eval_rows[: args.num_eval_prompts], args.max_prompt_length, "eval")
    probe = common.bind_probe(plumbing.load_function(args.probe, "probe"), [eval_rows[i] for i in kept])
    policy = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    policy = common.add_lora(policy, args, bf16=bf16)  # with --lora_r: adapters trained, the rest frozen
    # detail 26: the reference in the policy's own dtype, so that under the same autocast the two compute a token's
    # log-prob alike (KL 0 before the first update), or with LoRA the policy with its adapters off (detail 30); the
    # reward model only scores, in bf16 when autocast is
    if args.lora_r:
        ref_policy = common.WithoutAdapters(policy)
    else:
        ref_policy = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    scorer_dtype = torch.bfloat16 if bf16 else torch.float32
    rm_name = args.reward_model_name_or_path
    reward_model = plumbing.load_model(AutoModelForSequenceClassification, rm_name, tok, device, scorer_dtype)
    if reward_model.config.num_labels != 1 or not hasattr(reward_model, "score"):
        plumbing.fail(
            f"{rm_name} is not a reward model: expected a sequence classifier with one label "
            f"(reward.py's output), got {type(reward_model).__name__} with {reward_model.config.num_labels}"
        )
    frozen = [reward_model] + ([] if args.lora_r else [ref_policy])
    for model in frozen:
        model.requires_grad_(False)
    for model in (policy, *frozen):  # detail 9: dropout off, also while training
        plumbing.shard_model(model.eval())  # under torchrun: FSDP2
    common.seed_sampling(args.seed)
    forward_policy = torch.compile(policy) if use_compile else policy  # sampling and rollout forwards: eager
    num_steps = args.total_episodes // args.batch_size
    if args.max_steps is not None:
        num_steps = min(num_steps, args.max_steps)
    if num_steps == 0 or len(prompts) < args.batch_size:
        plumbing.fail(
            f"total_episodes {args.total_episodes} / {len(prompts)} prompts give no batch of {args.batch_size}"
        )
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    trained = [p for p in policy.parameters() if p.requires_grad]  # what is frozen is not in the optimizer
    optimizer = torch.optim.AdamW(trained, **adamw, fused=True)
    held = {id(p): p.numel() for m in (policy, ref_policy, reward_model) for p in m.parameters()}
    print(
        f"{sum(held.values()) / 1e6:.2f}M parameters in memory, {sum(p.numel() for p in trained) / 1e6:.2f}M trained "
        f"(no value model); {num_steps} steps of {args.batch_size} prompts x {args.rloo_k} responses, "
        f"{args.baseline} baseline"
    )

    def evaluate_policy(n):
        return common.evaluate(
            policy,
            tok,
            eval_prompts[:n],
            args,
            autocast,
            ref=ref_policy,
            gold_scorer=gold_scorer,
            reward_model=reward_model,
            probe=probe,
        )

    # ---- ALGO LOGIC: the RLOO / GRPO loop ----------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    order, curve, first_step, elapsed = [], [], 1, 0.0
    if args.resume:
        state = plumbing.load_checkpoint(args.output_dir, {"policy": policy}, optimizer, None)
        order, curve, elapsed, history[:] = state["order"], state["curve"], state["elapsed"], state["history"]
        first_step = state["step"] + 1
        rng.bit_generator.state = state["numpy_rng"]
    start = time.time() - elapsed
    eos, pad_id, k = tok.eos_token_id, tok.pad_token_id, args.rloo_k  # k: a prompt's group of responses
    if args.eval_every and not curve:  # where the curve starts: the SFT policy itself
        curve.append({"step": 0, "episodes": 0, **evaluate_policy(args.num_periodic_eval_prompts)[0]})
    progress = tqdm(total=num_steps, initial=first_step - 1, desc=args.baseline, mininterval=5)
    for step in range(first_step, num_steps + 1):
        optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - (step - 1) / num_steps)  # detail 15
        if len(order) < args.batch_size:
            order = [int(i) for i in rng.permutation(len(prompts))]
        batch = common.shard([prompts[order.pop()] for _ in range(args.batch_size)])  # this rank's share

        with torch.inference_mode(), autocast:  # no autograd at all for the rollout and the frozen models
            # 1. rollout: k responses per prompt, the prompts' rows repeated in place (a prompt's group is
            # rows i*k .. i*k + k-1), response_length tokens each from left-padded prompts (detail 2)
            queries, query_mask = (t.repeat_interleave(k, 0).to(device) for t in common.pad(batch, pad_id, "left"))
            with common.gathered(policy):
                raw = common.sample(policy, queries, query_mask, args.response_length, args.rollout_temperature, eos)
            # 2. the EOS trick: cut after the first EOS; a response without one scores missing_eos_score (detail 10)
            responses, response_mask, has_eos = common.truncate_after_eos(raw, eos, pad_id)
            R = int(response_mask.sum(1).max())  # columns that are padding in every row are dropped: exact, cheaper
            responses, response_mask = responses[:, :R], response_mask[:, :R]
            seq, seq_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
            # 3. log-probs of the sampled tokens at the temperature that sampled them (detail 3), and scores
            logprobs = common.forward_logprobs(policy, seq, seq_mask, args.rollout_temperature, keep=R).float()
            ref_logprobs = common.forward_logprobs(ref_policy, seq, seq_mask, args.rollout_temperature, keep=R).float()
            scores = common.sequence_scores(reward_model, seq, seq_mask)
        mask = response_mask.float()
        if not plumbing.finite_or_stop(scores, "reward-model score", step, args.skip_nonfinite):
            continue

        # 4. advantages from the other responses of the same prompt: no value model
        scores = torch.where(has_eos, scores, torch.full_like(scores, args.missing_eos_score))
        kl = ((logprobs - ref_logprobs) * mask).sum(1)  # the sequence's KL to the reference (k1)
        if args.baseline == "rloo":  # the KL paid in the reward (the non-score reward), as in ppo.py
            advantages = rloo_advantages((scores - args.kl_coef * kl).view(-1, k)).flatten()
        else:  # the KL enters the loss instead (step 5)
            advantages = grpo_advantages(scores.view(-1, k), args.grpo_eps).flatten()

        # 5. epochs over shuffled minibatches of micro-batches: the clipped surrogate (+ GRPO's KL term)
        stats = []
        for _ in range(args.num_ppo_epochs):
            perm = torch.randperm(n_responses, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
            for mb_start in range(0, n_responses, share):
                for micro_start in range(mb_start, mb_start + share, micro_size):
                    idx = perm[micro_start : micro_start + micro_size].to(device)
                    m = mask[idx]
                    with autocast:
                        logits = common.forward(forward_policy, seq[idx], seq_mask[idx], logits_to_keep=R + 1).logits
                        logits = logits[:, :-1]
                        new_logprobs = common.logprobs_from_logits(logits, responses[idx], args.rollout_temperature)
                    pg_loss, clipfrac, approxkl = policy_loss(
                        new_logprobs, logprobs[idx], advantages[idx], m, args.cliprange
                    )
                    kl_loss = masked_mean(kl_k3(new_logprobs, ref_logprobs[idx]), m)  # GRPO's KL term
                    loss = pg_loss + args.kl_coef * kl_loss if args.baseline == "grpo" else pg_loss
                    # the micro-batch's share of the (whole) minibatch: the ranks' gradients add up
                    (loss * len(idx) / minibatch_size).backward()
                    stats.append(torch.stack([pg_loss, kl_loss, clipfrac, approxkl]).detach())
                grad_norm = common.clip_grad_norm(trained, args.max_grad_norm)
                if plumbing.finite_or_stop(grad_norm, "loss", step, args.skip_nonfinite):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        # ---- TRY NOT TO MODIFY: logging (ppo.py's names), evaluation, checkpoints -------------------------
        if step % args.log_every == 0 or step == num_steps:
            # means over the batch's responses and the update's micro-batches, on every rank
            sums = [kl.sum(), (-logprobs * mask).sum(), scores.sum(), has_eos.float().sum(), mask.sum()]
            means = common.reduce_sum(torch.stack(sums).float()) / (args.batch_size * k)
            mean_kl, mean_entropy, mean_score, eos_rate, mean_length = means.tolist()
            update_means = common.reduce_sum(torch.stack(stats).mean(0)) / common.WORLD_SIZE
            pg, kl_term, clipfrac, approxkl = update_means.tolist()
            metrics = {
                "objective/kl": mean_kl,
                "objective/entropy": mean_entropy,
                "objective/rlhf_reward": mean_score - args.kl_coef * mean_kl,
                "objective/scores": mean_score,
                "objective/eos_rate": eos_rate,
                "policy/approxkl": approxkl,
                "policy/clipfrac": clipfrac,
                "loss/policy": pg,
                "loss/kl": kl_term,
                "val/mean_length": mean_length,
                "train/grad_norm": float(grad_norm),
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/episodes": step * args.batch_size,
            }
            progress.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
            log(metrics, step)
        if step % args.log_samples_every == 0:  # the first prompt's group of responses, with their scores
            query = tok.decode(batch[0], skip_special_tokens=True)
            texts = tok.batch_decode(responses[:k], skip_special_tokens=True)
            table = "".join(f"\n  {t}   [score {s:.2f}]" for t, s in zip(texts, scores[:k].tolist(), strict=True))
            tqdm.write(f"step {step}, {k} samples of: {query}{table}")
        if step % args.eval_every == 0 and step < num_steps:
            metrics, _ = evaluate_policy(args.num_periodic_eval_prompts)
            curve.append({"step": step, "episodes": step * args.batch_size, **metrics})
            tqdm.write(f"step {step}: " + " ".join(f"{name} {value:.3f}" for name, value in metrics.items()))
            log({f"eval/{name}": value for name, value in metrics.items()}, step)
        if args.save_every and step % args.save_every == 0 and step < num_steps:
            state = dict(step=step, order=order, curve=curve, numpy_rng=rng.bit_generator.state, history=history)
            state["elapsed"] = time.time() - start
            plumbing.save_checkpoint(args.output_dir, "rloo.py", args, {"policy": policy}, optimizer, None, state)
        progress.update()
    progress.close()
    train_seconds = time.time() - start

    # ---- evaluation -----------------------------------------------------------------------------------------
    metrics, samples = evaluate_policy(args.num_eval_prompts)
    episodes = num_steps * args.batch_size
    curve.append({"step": num_steps, "episodes": episodes, **metrics})
    results = {
        **metrics,
        "steps": num_steps,
        "episodes": episodes,
        "responses": episodes * k,
        "train_seconds": round(train_seconds, 1),
    }
    print(json.dumps(results, indent=2))
    for s in samples[:4]:
        print(f"  {s['prompt']} ->{s['response']}" + (f"   [gold {s['gold']}]" if "gold" in s else ""))
    log({f"eval/{name}": value for name, value in results.items()}, num_steps)

    # ---- TRY NOT TO MODIFY: saving ---------------------------------------------------------------------------
    weights = plumbing.full_state_dict(policy)  # under torchrun gathered from the shards; None in one process

    def write(tmp):
        plumbing.save_model(policy, tmp, weights)
        tok.save_pretrained(tmp)
        for name, rows in (("samples.jsonl", samples), ("curve.jsonl", curve), ("metrics.jsonl", history)):
            plumbing.write_jsonl(os.path.join(tmp, name), rows)
        plumbing.write_json(os.path.join(tmp, "eval.json"), results)

    plumbing.write_atomic(args.output_dir, "rloo.py", args, write)
    print(f"saved {args.output_dir}")
