"""PPO against a reward model, with a per-token KL penalty that keeps the policy near the SFT model.

    python ppo.py                               # the offline world: runs/sft against runs/reward
    python ppo.py --kl_coef 0 --total_episodes 32768 --output_dir runs/ppo_nokl   # watch Goodhart's law

RLHF as in Ziegler et al. 2019 and Ouyang et al. 2022, with the implementation details of Huang et al.
("The N+ Implementation Details of RLHF with PPO", 2024), numbered as in GUIDE.md section 3:

  rollout   sample `response_length` tokens from left-padded prompts at `temperature` (3); cut each
            response after its first EOS, and score responses without one `missing_eos_score` (10)
  reward    r_t = -kl_coef * KL_t (the non-score reward, per token) + score at the last token (11),
            KL_t from the k1 (log pi - log pi_ref) or k3 estimator; kl_coef fixed or adaptive
  advantage GAE (gamma, lam) over the response tokens; advantages whitened (13)
  update    `num_ppo_epochs` passes of shuffled minibatches over the rollout batch, each made of
            micro-batches (gradient accumulation): clipped policy loss + vf_coef * clipped value loss (14)

batch_size episodes per rollout = num_mini_batches minibatches per optimizer step set = micro-batches of
micro_batch_size per forward. The value model starts from the reward model and predicts a value per
token (12); dropout is off in every model (9); the learning rate anneals linearly to 0 (15).
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


@dataclass
class Args:
    model_name_or_path: str = "runs/sft"
    """the SFT policy: PPO starts from it, and it is the frozen reference of the KL penalty"""
    reward_model_name_or_path: str = "runs/reward"
    """the reward model (a one-label sequence classifier, e.g. reward.py's output); the value model starts from it"""
    dataset_name: str = "data/world/prompts"
    """prompts {prompt} (text or chat messages): the train split is rolled out, the held-out split evaluated"""
    output_dir: str = "runs/ppo"
    """where the policy (and value_model/) and eval.json are written (atomically)"""
    seed: int = 1
    """seed of the data order, sampling and minibatch shuffling"""
    total_episodes: int = 4096
    """prompts rolled out in all"""
    max_steps: int | None = None
    """stop after this many PPO updates (rollout batches); the learning-rate schedule follows it"""
    batch_size: int = 64
    """episodes per rollout batch; each rollout batch gives one PPO update"""
    num_mini_batches: int = 1
    """minibatches (optimizer steps) per PPO epoch"""
    micro_batch_size: int = 64
    """episodes per forward/backward pass; minibatch / micro_batch_size steps of gradient accumulation"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch"""
    learning_rate: float = 3e-5
    """AdamW learning rate, annealed linearly to 0 (3e-6 for Pythia on TL;DR)"""
    max_grad_norm: float = 1.0
    """gradient clipping of policy and value model together"""
    response_length: int = 48
    """tokens sampled per response (the EOS trick cuts after the first EOS)"""
    max_prompt_length: int = 128
    """longest prompt in tokens; longer ones are dropped (counted)"""
    temperature: float = 0.7
    """sampling temperature of rollouts; log-probs are computed at the same temperature"""
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
    eval_every: int = 16
    """updates between evaluations on held-out prompts (appended to curve.jsonl)"""
    num_eval_prompts: int = 256
    """held-out prompts of the final evaluation (periodic ones use a quarter)"""
    log_samples_every: int = 16
    """updates between tables of sample responses (stdout, and wandb with --track)"""
    gold_eval: bool = True
    """score samples with the offline world's gold rater (data/gold.py); turn off for other tasks"""
    save_every: int = 0
    """write a checkpoint (policy, value model, optimizer, RNG, data position) every this many updates; 0: never"""
    resume: bool = False
    """continue from the checkpoint in --output_dir"""
    skip_nonfinite: bool = False
    """skip a rollout batch whose scores or losses are not finite instead of stopping"""
    bf16: bool = True
    """bf16 autocast on CUDA (the CPU always runs fp32)"""
    compile: bool = True
    """torch.compile the training forwards on CUDA (never on CPU)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf-reference"
    """wandb project name"""


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
    """Clipped surrogate policy loss (Schulman et al. 2017, eq. 7), averaged over real response tokens, with
    its diagnostics."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    stats = {
        "policy/approxkl": 0.5 * common.masked_mean((new_logprobs - old_logprobs) ** 2, mask),
        "policy/clipfrac": common.masked_mean((pg_losses > -advantages * ratio).float(), mask),
        "val/ratio": common.masked_mean(ratio, mask),  # the policy's ratio, under the reference implementations' name
    }
    return common.masked_mean(pg_losses, mask), stats


def value_loss(new_values, old_values, returns, mask, cliprange_value=0.2):
    """Clipped value loss (the value clipping of the OpenAI baselines), averaged over real response tokens,
    and the share of tokens where clipping decided it."""
    values_clipped = old_values + (new_values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses = torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2)
    clipfrac = common.masked_mean(((new_values - returns) ** 2 < (values_clipped - returns) ** 2).float(), mask)
    return 0.5 * common.masked_mean(vf_losses, mask), clipfrac


def token_values(backbone, head, seq, mask, start):
    """The value head on every position from `start` - 1 to the second last: V(state before response token t)
    (detail 12: a value per token, from the reward model's backbone and head)."""
    hidden = backbone(input_ids=seq, attention_mask=mask, position_ids=common.position_ids(mask),
                      use_cache=False).last_hidden_state
    return head(hidden[:, start - 1:-1]).squeeze(-1).float()


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    common.check_args(args)
    common.seed_everything(args.seed)
    common.check_output_dir(args, "ppo.py")
    device, autocast, use_compile = common.device_and_autocast(args.bf16, args.compile, kernel_cache=32)
    run_name, log, history = common.start_tracking(args, "ppo")
    if args.batch_size % args.num_mini_batches or (args.batch_size // args.num_mini_batches) % args.micro_batch_size:
        common.fail(f"batch_size {args.batch_size} must split into num_mini_batches {args.num_mini_batches} "
                    f"minibatches of whole micro-batches of {args.micro_batch_size}")
    minibatch_size = args.batch_size // args.num_mini_batches

    # ---- data and models ----------------------------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    train_rows, eval_rows, _ = common.load_splits(args.dataset_name, [["prompt"]], seed=args.seed)
    prompts, _ = common.encode_prompts(tok, train_rows, args.max_prompt_length)
    eval_prompts, _ = common.encode_prompts(tok, eval_rows[:args.num_eval_prompts],
                                            args.max_prompt_length, "eval")
    frozen_dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32
    policy = common.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    ref_policy = common.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device, frozen_dtype)
    reward_model = common.load_model(AutoModelForSequenceClassification, args.reward_model_name_or_path, tok, device, frozen_dtype)
    value_model = common.load_model(AutoModelForSequenceClassification, args.reward_model_name_or_path, tok, device)
    if reward_model.config.num_labels != 1 or not hasattr(reward_model, "score"):
        common.fail(f"{args.reward_model_name_or_path} is not a reward model: expected a sequence classifier with "
                    f"one label (reward.py's output), got {type(reward_model).__name__} with {reward_model.config.num_labels}")
    for model in (ref_policy, reward_model):
        model.requires_grad_(False)
    # detail 9: dropout off everywhere. eval() mode for every model, also while training: gradients still
    # flow, and the log-probs of the update match those of the rollout exactly.
    for model in (policy, ref_policy, reward_model, value_model):
        model.eval()
    # the training forwards are compiled on CUDA; sampling and the rollout forwards run eagerly
    forward_policy, value_backbone = (torch.compile(m) if use_compile else m for m in (policy, value_model.base_model))
    num_updates = args.total_episodes // args.batch_size
    if args.max_steps is not None:
        num_updates = min(num_updates, args.max_steps)
    if num_updates == 0 or len(prompts) < args.batch_size:
        common.fail(f"total_episodes {args.total_episodes} / {len(prompts)} prompts give no batch of {args.batch_size}")
    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5, fused=True)  # eps as in the references (15)
    print(f"policy {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M + value "
          f"{sum(p.numel() for p in value_model.parameters()) / 1e6:.2f}M parameters; {num_updates} updates of "
          f"{args.batch_size} episodes, {args.num_ppo_epochs} epochs x {args.num_mini_batches} minibatches")

    def evaluate(n):
        metrics, samples = common.evaluate(policy, tok, eval_prompts[:n], args.response_length, args.temperature,
                                           64, autocast, ref=ref_policy, gold=args.gold_eval, reward_model=reward_model)
        return metrics, samples

    # ---- training -----------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    order, kl_coef, curve, first_update, elapsed = [], args.kl_coef, [], 1, 0.0
    if args.resume:
        state = common.load_checkpoint(args.output_dir, {"policy": policy, "value_model": value_model}, optimizer, None)
        order, kl_coef, curve, elapsed, history[:] = (state[k] for k in ("order", "kl_coef", "curve", "elapsed", "history"))
        first_update = state["step"] + 1
        rng.bit_generator.state = state["numpy_rng"]
    start = time.time() - elapsed
    eos, pad_id = tok.eos_token_id, tok.pad_token_id
    if args.eval_every and not curve:  # where the curve starts: the SFT policy itself
        curve.append({"update": 0, "episodes": 0, **evaluate(args.num_eval_prompts // 4)[0]})
    progress = tqdm(total=num_updates, initial=first_update - 1, desc="ppo", mininterval=5)
    for update in range(first_update, num_updates + 1):
        # detail 15: the learning rate anneals linearly to 0 over the updates
        optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - (update - 1) / num_updates)
        if len(order) < args.batch_size:
            order = [int(i) for i in rng.permutation(len(prompts))]
        batch = [prompts[order.pop()] for _ in range(args.batch_size)]

        # -- rollout: sample, cut after EOS, score, and the log-probs and values of what was sampled
        with torch.inference_mode(), autocast:  # no autograd at all for the rollout and the frozen models
            queries, query_mask = (t.to(device) for t in common.pad(batch, pad_id, "left"))
            raw = common.sample(policy, queries, query_mask, args.response_length, args.temperature, eos)
            responses, response_mask, has_eos = common.truncate_after_eos(raw, eos, pad_id)
            R = int(response_mask.sum(1).max())  # columns that are padding in every row are dropped: exact, cheaper
            responses, response_mask = responses[:, :R], response_mask[:, :R]
            seq, seq_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
            Q = queries.shape[1]
            # detail 4: log-probs of the sampled tokens under the same temperature that sampled them
            logprobs = common.forward_logprobs(policy, seq, seq_mask, args.temperature, keep=R).float()
            ref_logprobs = common.forward_logprobs(ref_policy, seq, seq_mask, args.temperature, keep=R).float()
            values = token_values(value_model.base_model, value_model.score, seq, seq_mask, Q)
            scores = common.sequence_scores(reward_model, seq, seq_mask)
        mask = response_mask.float()
        if not common.finite_or_stop(scores, "reward-model score", update, args.skip_nonfinite):
            continue

        # -- rewards: the per-token KL penalty (non-score reward), plus the score at the last real token
        rewards, non_score_reward, kl, scores = shaped_rewards(scores, has_eos, logprobs, ref_logprobs, mask, kl_coef,
                                                               args.kl_estimator, args.missing_eos_score)
        if args.whiten_rewards:
            rewards = common.masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        advantages = common.masked_whiten(advantages, mask) * mask  # detail 13

        # -- PPO epochs over shuffled minibatches of micro-batches
        stats = []
        for epoch in range(args.num_ppo_epochs):
            perm = torch.randperm(args.batch_size, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
            for mb_start in range(0, args.batch_size, minibatch_size):
                for micro_start in range(mb_start, mb_start + minibatch_size, args.micro_batch_size):
                    idx = perm[micro_start:micro_start + args.micro_batch_size].to(device)
                    m = mask[idx]
                    scale = len(idx) / minibatch_size  # the micro-batch's share of the minibatch's mean loss
                    # The policy and the value model share no weights, so the total loss
                    # pg_loss - entropy_coef * entropy + vf_coef * vf_loss is backpropagated in two parts: only one
                    # model's activations are alive at a time (same gradients, less peak memory).
                    with autocast:
                        out = forward_policy(input_ids=seq[idx], attention_mask=seq_mask[idx], use_cache=False,
                                             position_ids=common.position_ids(seq_mask[idx]), logits_to_keep=R + 1)
                        new_logprobs = common.logprobs_from_logits(out.logits[:, :-1], responses[idx], args.temperature)
                    pg_loss, pg_stats = policy_loss(new_logprobs, logprobs[idx], advantages[idx], m, args.cliprange)
                    # entropy of the (temperature-scaled) policy, in blocks of rows like the log-probs; differentiated
                    # only when it is a bonus in the loss (a full-vocabulary softmax is costly to backpropagate)
                    with torch.set_grad_enabled(args.entropy_coef != 0):
                        entropy = common.masked_mean(common.entropy_from_logits(out.logits[:, :-1], args.temperature), m)
                    ((pg_loss - args.entropy_coef * entropy) * scale).backward()
                    del out  # free the policy's logits before the value model's pass
                    with autocast:
                        new_values = token_values(value_backbone, value_model.score, seq[idx], seq_mask[idx], Q)
                    vf_loss, vf_clipfrac = value_loss(new_values, values[idx], returns[idx], m, args.cliprange_value)
                    (args.vf_coef * vf_loss * scale).backward()
                    stats.append(torch.stack([pg_loss, vf_loss, entropy, pg_stats["policy/approxkl"],
                                              pg_stats["policy/clipfrac"], vf_clipfrac, pg_stats["val/ratio"]]).detach())
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if common.finite_or_stop(grad_norm, "loss", update, args.skip_nonfinite):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        # -- adaptive KL (Ziegler et al. 2019): nudge kl_coef so the KL per response tracks target_kl
        mean_kl = kl.sum(1).mean()
        if args.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, float(mean_kl), args.target_kl, args.batch_size, args.kl_horizon)

        # -- logging: the reference implementations' metric names (detail 17)
        if update % 4 == 0 or update == num_updates:
            pg, vf, ent, approxkl, clipfrac, vclipfrac, ratio = torch.stack(stats).mean(0).tolist()
            metrics = {
                "objective/kl": float(mean_kl), "objective/entropy": float((-logprobs * mask).sum(1).mean()),
                "objective/non_score_reward": float(non_score_reward.sum(1).mean()),
                "objective/rlhf_reward": float((scores + non_score_reward.sum(1)).mean()),
                "objective/scores": float(scores.mean()), "objective/eos_rate": float(has_eos.float().mean()),
                "policy/approxkl": approxkl, "policy/clipfrac": clipfrac, "policy/entropy": ent,
                "loss/policy": pg, "loss/value": vf, "val/clipfrac": vclipfrac, "val/ratio": ratio,
                "val/mean_length": float(mask.sum(1).mean()), "lr": optimizer.param_groups[0]["lr"],
                "kl_coef": kl_coef, "episodes": update * args.batch_size,
            }
            progress.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
            log(metrics, update)
        if update % args.log_samples_every == 0:
            texts = tok.batch_decode(responses[:4], skip_special_tokens=True)
            table = [[tok.decode(batch[i], skip_special_tokens=True), texts[i], float(scores[i])] for i in range(len(texts))]
            tqdm.write(f"update {update} samples:" + "".join(f"\n  {q} ->{r}   [score {s:.2f}]" for q, r, s in table))
            if args.track:
                import wandb

                log({"samples": wandb.Table(columns=["query", "response", "score"], data=table)}, update)
        if update % args.eval_every == 0 and update < num_updates:
            metrics, _ = evaluate(args.num_eval_prompts // 4)
            curve.append({"update": update, "episodes": update * args.batch_size, **metrics})
            tqdm.write(f"update {update}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            log({f"eval/{k}": v for k, v in metrics.items()}, update)
        if args.save_every and update % args.save_every == 0 and update < num_updates:
            common.save_checkpoint(args.output_dir, "ppo.py", args, {"policy": policy, "value_model": value_model},
                                   optimizer, None, {"step": update, "order": order, "kl_coef": kl_coef, "curve": curve,
                                                     "numpy_rng": rng.bit_generator.state, "history": history,
                                                     "elapsed": time.time() - start})
        progress.update()
    progress.close()
    train_seconds = time.time() - start

    # ---- evaluation ---------------------------------------------------------------------------------
    metrics, samples = evaluate(args.num_eval_prompts)
    curve.append({"update": num_updates, "episodes": num_updates * args.batch_size, **metrics})
    results = {**metrics, "updates": num_updates, "episodes": num_updates * args.batch_size,
               "final_kl_coef": kl_coef, "train_seconds": round(train_seconds, 1)}
    print(json.dumps(results, indent=2))
    for s in samples[:4]:
        print(f"  {s['prompt']} ->{s['response']}" + (f"   [gold {s['gold']}]" if "gold" in s else ""))
    log({f"eval/{k}": v for k, v in results.items()}, num_updates)

    # ---- saving -------------------------------------------------------------------------------------
    def write(tmp):
        policy.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        value_model.save_pretrained(os.path.join(tmp, "value_model"))
        for name, rows in (("samples.jsonl", samples), ("curve.jsonl", curve), ("metrics.jsonl", history)):
            common.write_jsonl(os.path.join(tmp, name), rows)
        with open(os.path.join(tmp, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)

    common.save_atomic(args.output_dir, "ppo.py", args, write)
    print(f"saved {args.output_dir}")
