"""PPO against a reward model, with a per-token KL penalty that keeps the policy near the SFT model.

    python ppo.py                               # the offline world: runs/sft against runs/reward
    python ppo.py --kl_coef 0 --total_episodes 6144 --output_dir runs/ppo_nokl   # watch Goodhart's law

RLHF as in Ziegler et al. 2019 and Ouyang et al. 2022, with the implementation details that Huang et al.
collected (the "N" and "N+" details), numbered as in docs/implementation_details.md. Each step rolls out
`batch_size` episodes (an episode: a prompt and the response sampled for it) and learns from them; the
comments number the step's parts as that file's "ppo.py" list does:

  1-2  sample `response_length` tokens per left-padded prompt; cut after the first EOS, and score responses
       without one `missing_eos_score` (details 2, 10)
  3    log-probs of the policy and the reference at the rollout temperature, values, scores (details 3, 12)
  4    r_t = -kl_coef * KL_t (the non-score reward) + the score at the last token (detail 11)
  5    GAE over the response tokens, advantages whitened (detail 13)
  6    `num_ppo_epochs` passes of shuffled minibatches of micro-batches (gradient accumulation), minimising
       the clipped objective (details 14, 15)
  7    adaptive kl_coef (detail 11)

Sizes: batch_size episodes per step = num_mini_batches minibatches (one optimizer step each, per epoch) =
micro-batches of micro_batch_size per forward. The value model starts from the reward model and predicts a
value per token (12); dropout is off in every model (9); the learning rate anneals linearly to 0 (15).
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
    total_episodes: int = 4096
    """episodes (prompts rolled out) in all"""
    max_steps: int | None = None
    """stop after this many steps (rollout batches); the learning-rate schedule follows it"""
    batch_size: int = 64
    """episodes per step: one rollout batch, learnt from in num_ppo_epochs x num_mini_batches optimizer steps;
    under torchrun the global batch, split over the processes"""
    num_mini_batches: int = 1
    """minibatches (optimizer steps) per PPO epoch"""
    micro_batch_size: int = 64
    """episodes per forward/backward pass of one process; the rest of its share of a minibatch is gradient
    accumulation"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch"""
    learning_rate: float = 3e-5
    """AdamW learning rate, annealed linearly to 0 (3e-6 for Pythia on TL;DR)"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (torch's defaults, as the reference implementations use them)"""
    adam_eps: float = 1e-5
    """AdamW epsilon (detail 15)"""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default)"""
    max_grad_norm: float = 1.0
    """gradient clipping of policy and value model together"""
    response_length: int = 48
    """tokens sampled per rollout response (the EOS trick cuts after the first EOS)"""
    rollout_temperature: float = 0.7
    """sampling temperature of rollouts; their log-probs are computed at the same temperature (detail 3)"""
    missing_eos_score: float = -1.0
    """the score given to a response with no EOS in response_length tokens, instead of the reward model's"""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty -beta * KL_t (the start value when adaptive)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1: log pi - log pi_ref; k3: (r - 1) - log r with r = pi_ref / pi (unbiased, never negative)"""
    adaptive_kl: bool = False
    """adapt kl_coef towards target_kl (Ziegler et al. 2019, eq. 2)"""
    target_kl: float = 3.0
    """adaptive: the KL (nats per response) kl_coef steers towards"""
    kl_horizon: int = 10000
    """adaptive: the horizon in episodes of the proportional controller"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_rewards: bool = False
    """whiten the per-token rewards of each batch (keeping their mean) before GAE"""
    cliprange: float = 0.2
    """PPO clip range of the probability ratio"""
    cliprange_value: float = 0.2
    """clip range of the value prediction around its rollout value"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    entropy_coef: float = 0.0
    """weight of an entropy bonus (0: entropy only reported)"""
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
    """the policy PPO starts from: the SFT policy, which is also the frozen reference of the KL penalty"""
    ref_model_name_or_path: str | None = None
    """a different frozen reference (e.g. the SFT policy when PPO continues from a trained one; iterated RLHF)"""
    reward_model_name_or_path: str = "runs/reward"
    """the reward model (a one-label sequence classifier, e.g. reward.py's output); the value model starts from it"""
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
    """sampling temperature of the evaluation samples (the same in dpo.py, ppo.py and rlaif.py)"""
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
    output_dir: str = "runs/ppo"
    """where the policy (and value_model/) and eval.json are written (atomically)"""
    seed: int = 1
    """seed of the data order, sampling and minibatch shuffling"""
    save_every: int = 0
    """write a checkpoint (policy, value model, optimizer, RNG, data position) every this many steps; 0: never"""
    resume: bool = False
    """continue from the checkpoint in --output_dir"""
    skip_nonfinite: bool = False
    """skip a rollout batch whose scores or losses are not finite instead of stopping"""
    bf16: bool | None = None
    """bf16 autocast (--bf16 True/False); by default on with CUDA, off on the CPU"""
    compile: bool | None = None
    """torch.compile the training forwards (--compile True/False); by default on with CUDA, off on the CPU"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf-reference"
    """wandb project name"""


# ---- masked statistics: means and variances over the real response tokens only (detail 13) ------------
def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim) if dim is not None else (x * mask).sum() / mask.sum()


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the batch's real tokens only (unbiased variance); shift_mean=False keeps the mean.
    Under torchrun the batch is every rank's share: the sums below run over all ranks, so each rank whitens its
    share exactly as one process would whiten the whole batch."""

    def batch_mean(y):
        sums = common.reduce_sum(torch.stack([(y * mask).sum(), mask.sum()]))
        return sums[0] / sums[1], sums[1]

    mean, n = batch_mean(x)
    var = batch_mean((x - mean) ** 2)[0] * n / (n - 1)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    return white if shift_mean else white + mean


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits), as logsumexp - E[logit]: no log_softmax copy."""
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy of the temperature-scaled policy, (B, T), in blocks of rows like the log-probs."""
    return common.in_row_blocks(token_entropy, logits, temperature=temperature)


# ---- the algorithm's parts ------------------------------------------------------------------------------
def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL")."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio  # k3: (r - 1) - log r, r = pi_ref / pi


def shaped_rewards(scores, has_eos, logprobs, ref_logprobs, mask, kl_coef, estimator="k1", missing_eos_score=-1.0):
    """Per-token rewards of a rollout batch (details 10 and 11): the non-score reward -kl_coef * KL_t on every
    response token, plus the score on the last real token; a response without EOS scores missing_eos_score.
    Returns (rewards, non_score_reward, kl, scores)."""
    scores = torch.where(has_eos, scores, torch.full_like(scores, missing_eos_score))
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    non_score_reward = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, non_score_reward, kl, scores


def adaptive_kl_coef(kl_coef, mean_kl, target_kl, n_episodes, horizon):
    """Ziegler et al. 2019, eq. 2: proportional control of beta towards a target KL, error clipped to 20%."""
    error = min(max(mean_kl / target_kl - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_episodes / horizon)


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over the response tokens:
    A_t = sum_k (gamma * lam)^k delta_{t+k}, delta_t = r_t + gamma * V_{t+1} - V_t, V = 0 after the last token.
    The discounted sum is one matrix product instead of a Python loop over time."""
    values, rewards = values * mask, rewards * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = rewards + gamma * next_values - values
    t = torch.arange(rewards.shape[1], device=rewards.device)
    discount = (gamma * lam) ** (t[:, None] - t[None, :]).clamp(min=0).to(rewards.dtype) * (t[:, None] >= t[None, :])
    advantages = deltas @ discount  # [b, t] = sum_k deltas[b, k] * (gamma lam)^(k - t) for k >= t
    return advantages, advantages + values


def policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange=0.2):
    """Clipped surrogate policy loss (Schulman et al. 2017, eq. 7), averaged over real response tokens, with its
    diagnostics."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    stats = {
        "policy/approxkl": 0.5 * masked_mean((new_logprobs - old_logprobs) ** 2, mask),
        "policy/clipfrac": masked_mean((pg_losses > -advantages * ratio).float(), mask),
        "val/ratio": masked_mean(ratio, mask),  # the policy's ratio, under the reference implementations' name
    }
    return masked_mean(pg_losses, mask), stats


def value_loss(new_values, old_values, returns, mask, cliprange_value=0.2):
    """Clipped value loss (the value clipping of the OpenAI baselines), averaged over real response tokens, and
    the share of tokens where clipping decided it."""
    values_clipped = old_values + (new_values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses = torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2)
    clipfrac = masked_mean(((new_values - returns) ** 2 < (values_clipped - returns) ** 2).float(), mask)
    return 0.5 * masked_mean(vf_losses, mask), clipfrac


def token_values(backbone, head, seq, mask, start):
    """The value head on every position from `start` - 1 to the second last: V(state before response token t)
    (detail 12: a value per token, from the reward model's backbone and head)."""
    hidden = common.forward(backbone, seq, mask).last_hidden_state
    return head(hidden[:, start - 1 : -1]).squeeze(-1).float()


if __name__ == "__main__":
    # ---- TRY NOT TO MODIFY: arguments, seeding, device ------------------------------------------------
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "lora_alpha max_steps batch_size micro_batch_size adam_eps max_grad_norm log_every eval_every "
            "num_eval_prompts max_new_tokens eval_temperature eval_batch_size total_episodes "
            "num_mini_batches num_ppo_epochs response_length rollout_temperature cliprange "
            "max_prompt_length num_periodic_eval_prompts log_samples_every target_kl kl_horizon "
            "cliprange_value",
            "[0, inf)": "lora_r learning_rate weight_decay save_every kl_coef vf_coef entropy_coef",
            "[0, 1)": "lora_dropout adam_betas",
            "[0, 1]": "gamma lam",
            "(-inf, inf)": "seed missing_eos_score",
        },
    )
    minibatch_size = args.batch_size // args.num_mini_batches
    if args.batch_size % args.num_mini_batches or minibatch_size % (common.WORLD_SIZE * args.micro_batch_size):
        processes = f", over {common.WORLD_SIZE} processes," if common.WORLD_SIZE > 1 else ""
        plumbing.fail(
            f"batch_size {args.batch_size} must split into num_mini_batches {args.num_mini_batches} "
            f"minibatches of whole micro-batches of {args.micro_batch_size}{processes}"
        )
    plumbing.seed_everything(args.seed)
    plumbing.check_output_dir(args, "ppo.py")
    gold_scorer = plumbing.load_function(args.gold_scorer, "gold_scorer")
    device, autocast, use_compile, bf16 = plumbing.device_and_autocast(args.bf16, args.compile, kernel_cache=32)
    log, history = plumbing.start_tracking(args, "ppo")

    # ---- TRY NOT TO MODIFY: data and models -----------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    train_rows, eval_rows, _ = common.load_splits(args.dataset_name, [["prompt"]], seed=args.seed)
    prompts, _ = common.encode_prompts(tok, train_rows, args.max_prompt_length)
    eval_prompts, kept = common.encode_prompts(tok, eval_rows[: args.num_eval_prompts], args.max_prompt_length, "eval")
    probe = common.bind_probe(plumbing.load_function(args.probe, "probe"), [eval_rows[i] for i in kept])
    policy = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    rm_name = args.reward_model_name_or_path
    value_model = plumbing.load_model(AutoModelForSequenceClassification, rm_name, tok, device)  # detail 12
    if value_model.config.num_labels != 1 or not hasattr(value_model, "score"):
        plumbing.fail(
            f"{rm_name} is not a reward model: expected a sequence classifier with one label "
            f"(reward.py's output), got {type(value_model).__name__} with {value_model.config.num_labels}"
        )
    # detail 26: the reference in the policy's own dtype, so that under the same autocast the two compute a token's
    # log-prob alike (KL 0 before the first update); the reward model only scores, in bf16 when autocast is
    models = [policy, value_model]
    if args.lora_r:  # detail 30: adapters on both; with them off the same weights are the reference and the reward
        policy = common.add_lora(policy, args, bf16=bf16)  # model, one copy of each base in memory
        value_model = common.add_lora(value_model, args, heads=["score"], bf16=bf16)  # the value head: a copy
        reward_model = common.WithoutAdapters(value_model)
    else:
        scorer_dtype = torch.bfloat16 if bf16 else torch.float32
        reward_model = plumbing.load_model(AutoModelForSequenceClassification, rm_name, tok, device, scorer_dtype)
        models.append(reward_model.requires_grad_(False))
    if args.lora_r and not args.ref_model_name_or_path:
        ref_policy = common.WithoutAdapters(policy)
    else:
        ref_name = args.ref_model_name_or_path or args.model_name_or_path
        ref_policy = plumbing.load_model(AutoModelForCausalLM, ref_name, tok, device).requires_grad_(False)
        models.append(ref_policy)
    # detail 9: dropout off everywhere. eval() mode for every model, also while training: gradients still flow,
    # and the log-probs of the update match those of the rollout exactly.
    for model in models:
        plumbing.shard_model(model.eval())  # under torchrun: FSDP2
    common.seed_sampling(args.seed)
    # the training forwards are compiled on CUDA; sampling and the rollout forwards run eagerly
    forward_policy, value_backbone = (torch.compile(m) if use_compile else m for m in (policy, value_model.base_model))
    num_steps = args.total_episodes // args.batch_size
    if args.max_steps is not None:
        num_steps = min(num_steps, args.max_steps)
    if num_steps == 0 or len(prompts) < args.batch_size:
        plumbing.fail(
            f"total_episodes {args.total_episodes} / {len(prompts)} prompts give no batch of {args.batch_size}"
        )
    params = [p for model in (policy, value_model) for p in model.parameters() if p.requires_grad]  # not the frozen
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(params, **adamw, fused=True)
    held = {id(p): p.numel() for m in (policy, ref_policy, value_model, reward_model) for p in m.parameters()}
    print(
        f"{sum(held.values()) / 1e6:.2f}M parameters in memory, {sum(p.numel() for p in params) / 1e6:.2f}M trained; "
        f"{num_steps} steps of {args.batch_size} episodes, {args.num_ppo_epochs} epochs x {args.num_mini_batches} "
        "minibatches"
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

    # ---- ALGO LOGIC: the PPO loop ------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    order, kl_coef, curve, first_step, elapsed = [], args.kl_coef, [], 1, 0.0
    if args.resume:
        models = {"policy": policy, "value_model": value_model}
        state = plumbing.load_checkpoint(args.output_dir, models, optimizer, None)
        order, kl_coef, curve, elapsed = state["order"], state["kl_coef"], state["curve"], state["elapsed"]
        history[:], first_step = state["history"], state["step"] + 1
        rng.bit_generator.state = state["numpy_rng"]
    start = time.time() - elapsed
    eos, pad_id = tok.eos_token_id, tok.pad_token_id
    if args.eval_every and not curve:  # where the curve starts: the SFT policy itself
        curve.append({"step": 0, "episodes": 0, **evaluate_policy(args.num_periodic_eval_prompts)[0]})
    progress = tqdm(total=num_steps, initial=first_step - 1, desc="ppo", mininterval=5)
    for step in range(first_step, num_steps + 1):
        # detail 15: the learning rate anneals linearly to 0 over the steps
        optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - (step - 1) / num_steps)
        if len(order) < args.batch_size:
            order = [int(i) for i in rng.permutation(len(prompts))]
        batch = common.shard([prompts[order.pop()] for _ in range(args.batch_size)])  # this rank's share

        with torch.inference_mode(), autocast:  # no autograd at all for the rollout and the frozen models
            # 1. rollout: response_length tokens sampled from left-padded prompts (detail 2)
            queries, query_mask = (t.to(device) for t in common.pad(batch, pad_id, "left"))
            with common.gathered(policy):
                raw = common.sample(policy, queries, query_mask, args.response_length, args.rollout_temperature, eos)
            # 2. the EOS trick: cut after the first EOS (its score is replaced in step 4 when there is none)
            responses, response_mask, has_eos = common.truncate_after_eos(raw, eos, pad_id)
            R = int(response_mask.sum(1).max())  # columns that are padding in every row are dropped: exact, cheaper
            responses, response_mask = responses[:, :R], response_mask[:, :R]
            seq, seq_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
            Q = queries.shape[1]
            # 3. log-probs of the sampled tokens at the temperature that sampled them (detail 3), values, scores
            logprobs = common.forward_logprobs(policy, seq, seq_mask, args.rollout_temperature, keep=R).float()
            ref_logprobs = common.forward_logprobs(ref_policy, seq, seq_mask, args.rollout_temperature, keep=R).float()
            values = token_values(value_model.base_model, value_model.score, seq, seq_mask, Q)
            scores = common.sequence_scores(reward_model, seq, seq_mask)
        mask = response_mask.float()
        if not plumbing.finite_or_stop(scores, "reward-model score", step, args.skip_nonfinite):
            continue

        # 4. rewards: the per-token KL penalty (the non-score reward), plus the score at the last real token
        rewards, non_score_reward, kl, scores = shaped_rewards(
            scores, has_eos, logprobs, ref_logprobs, mask, kl_coef, args.kl_estimator, args.missing_eos_score
        )
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        # 5. advantages: GAE, whitened over the batch's real tokens
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask) * mask

        # 6. PPO epochs over shuffled minibatches of micro-batches (under torchrun, of this rank's share)
        stats, share = [], len(batch) // args.num_mini_batches
        for _ in range(args.num_ppo_epochs):
            perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
            for mb_start in range(0, len(batch), share):
                for micro_start in range(mb_start, mb_start + share, args.micro_batch_size):
                    idx = perm[micro_start : micro_start + args.micro_batch_size].to(device)
                    m = mask[idx]
                    # the micro-batch's share of the (whole) minibatch's mean loss: ranks' gradients add up
                    scale = len(idx) / minibatch_size
                    # PPO's objective (Schulman et al. 2017, eq. 9), minimised:
                    #     loss = pg_loss - entropy_coef * entropy + vf_coef * vf_loss
                    # The policy and the value model share no weights, so the two parts are backpropagated one
                    # after the other: the same gradients, with one model's activations alive at a time.
                    with autocast:
                        logits = common.forward(forward_policy, seq[idx], seq_mask[idx], logits_to_keep=R + 1).logits
                        logits = logits[:, :-1]
                        new_logprobs = common.logprobs_from_logits(logits, responses[idx], args.rollout_temperature)
                    pg_loss, pg_stats = policy_loss(new_logprobs, logprobs[idx], advantages[idx], m, args.cliprange)
                    # the entropy is differentiated only as a bonus in the loss (a softmax is costly to backpropagate)
                    with torch.set_grad_enabled(args.entropy_coef != 0):
                        entropy = masked_mean(entropy_from_logits(logits, args.rollout_temperature), m)
                    ((pg_loss - args.entropy_coef * entropy) * scale).backward()
                    del logits  # free the policy's logits before the value model's pass
                    with autocast:
                        new_values = token_values(value_backbone, value_model.score, seq[idx], seq_mask[idx], Q)
                    vf_loss, vf_clipfrac = value_loss(new_values, values[idx], returns[idx], m, args.cliprange_value)
                    (args.vf_coef * vf_loss * scale).backward()
                    stats.append(torch.stack([pg_loss, vf_loss, entropy, *pg_stats.values(), vf_clipfrac]).detach())
                grad_norm = common.clip_grad_norm(params, args.max_grad_norm)
                if plumbing.finite_or_stop(grad_norm, "loss", step, args.skip_nonfinite):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        # the batch's means over every rank's share: for the KL controller and the logs
        sums = [kl.sum(), (-logprobs * mask).sum(), non_score_reward.sum(), scores.sum(), has_eos.sum(), mask.sum()]
        means = common.reduce_sum(torch.stack(sums).float()) / args.batch_size
        mean_kl, mean_entropy, mean_non_score_reward, mean_score, eos_rate, mean_length = means.tolist()

        # 7. adaptive KL (Ziegler et al. 2019): nudge kl_coef so that the KL per response tracks target_kl
        if args.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, mean_kl, args.target_kl, args.batch_size, args.kl_horizon)

        # ---- TRY NOT TO MODIFY: logging (the reference implementations' names, detail 16), evaluation ------
        if step % args.log_every == 0 or step == num_steps:
            update_means = common.reduce_sum(torch.stack(stats).mean(0)) / common.WORLD_SIZE
            pg, vf, entropy, approxkl, clipfrac, ratio, vf_clipfrac = update_means.tolist()
            metrics = {
                "objective/kl": mean_kl,
                "objective/entropy": mean_entropy,
                "objective/non_score_reward": mean_non_score_reward,
                "objective/rlhf_reward": mean_score + mean_non_score_reward,
                "objective/scores": mean_score,
                "objective/eos_rate": eos_rate,
                "policy/approxkl": approxkl,
                "policy/clipfrac": clipfrac,
                "policy/entropy": entropy,
                "loss/policy": pg,
                "loss/value": vf,
                "val/clipfrac": vf_clipfrac,
                "val/ratio": ratio,
                "val/mean_length": mean_length,
                "train/grad_norm": float(grad_norm),
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/kl_coef": kl_coef,
                "train/episodes": step * args.batch_size,
            }
            progress.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
            log(metrics, step)
        if step % args.log_samples_every == 0:
            texts = tok.batch_decode(responses[:4], skip_special_tokens=True)
            table = [[tok.decode(batch[i], skip_special_tokens=True), t, float(scores[i])] for i, t in enumerate(texts)]
            tqdm.write(f"step {step} samples:" + "".join(f"\n  {q} ->{r}   [score {s:.2f}]" for q, r, s in table))
            if args.track:
                import wandb

                log({"samples": wandb.Table(columns=["query", "response", "score"], data=table)}, step)
        if step % args.eval_every == 0 and step < num_steps:
            metrics, _ = evaluate_policy(args.num_periodic_eval_prompts)
            curve.append({"step": step, "episodes": step * args.batch_size, **metrics})
            tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            log({f"eval/{k}": v for k, v in metrics.items()}, step)
        if args.save_every and step % args.save_every == 0 and step < num_steps:
            state = {
                "step": step,
                "order": order,
                "kl_coef": kl_coef,
                "curve": curve,
                "numpy_rng": rng.bit_generator.state,
                "history": history,
                "elapsed": time.time() - start,
            }
            models = {"policy": policy, "value_model": value_model}
            plumbing.save_checkpoint(args.output_dir, "ppo.py", args, models, optimizer, None, state)
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
        "final_kl_coef": kl_coef,
        "train_seconds": round(train_seconds, 1),
    }
    print(json.dumps(results, indent=2))
    for s in samples[:4]:
        print(f"  {s['prompt']} ->{s['response']}" + (f"   [gold {s['gold']}]" if "gold" in s else ""))
    log({f"eval/{k}": v for k, v in results.items()}, num_steps)

    # ---- TRY NOT TO MODIFY: saving ---------------------------------------------------------------------------
    weights = {m: plumbing.full_state_dict(m) for m in (policy, value_model)}  # None in one process

    def write(tmp):
        plumbing.save_model(policy, tmp, weights[policy])
        tok.save_pretrained(tmp)
        plumbing.save_model(value_model, os.path.join(tmp, "value_model"), weights[value_model])
        for name, rows in (("samples.jsonl", samples), ("curve.jsonl", curve), ("metrics.jsonl", history)):
            plumbing.write_jsonl(os.path.join(tmp, name), rows)
        plumbing.write_json(os.path.join(tmp, "eval.json"), results)

    plumbing.write_atomic(args.output_dir, "ppo.py", args, write)
    print(f"saved {args.output_dir}")
