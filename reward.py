"""Reward modelling: a scalar score on a language-model backbone, trained on preferences, ratings or thumbs.

    python reward.py                            # the offline world: from runs/sft, on data/world/preference
    python reward.py --dataset_name data/world/ratings     # or data/world/binary (thumbs), data/world/ranking

The Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1) says a labeller prefers y_c over y_r
with probability sigmoid(r(x, y_c) - r(x, y_r)); training minimises -log sigmoid(r_c - r_r). Options: a
per-pair margin subtracted inside the sigmoid (Touvron et al. 2023, Llama 2), soft labels p for distilling
an AI labeller (cross-entropy against the pair softmax, as in RLAIF), and the reward-centering regulariser
coef * (r_c + r_r)^2 (Eisenstein et al. 2023). Rankings of K responses per prompt ({prompt, responses}, best
first) train on all K(K-1)/2 pairs of a prompt together, each response scored once, the loss averaged over the
prompt's pairs (Ouyang et al. 2022, section 3.5): a prompt is one example, however many responses it ranks. A
preference pair is a ranking of two.

Responses judged one at a time (detail 31) are examples of their own. Thumbs ({prompt, completion, label}, label
true for up: TRL's unpaired format) train a binary classifier whose logit is the reward, P(up) = sigmoid(r).
Ratings ({prompt, completion, rating} on the integer scale --rating_scale) train by regression of the reward on
the rating centred on the training data's mean (SteerLM and HelpSteer2's loss), or with --rating_loss ordinal by
the cumulative-logit model P(rating <= k) = sigmoid(k + 1/2 - mean - r), cut points a rating apart. Regression is
the default because it needs nothing but ratings, one a response. Where a prompt has two or more rated responses,
Bradley-Terry on the pairs of its different ratings, the difference as the margin (the pairs' path trains them,
--margin_column), is the better use of them: on the world's 1-7 ratings it ordered held-out pairs better than
regression, over three seeds, though it leaves out every tie; the ordinal loss did no better than regression
(docs/results.md, "Every form of feedback at equal effort"). Whatever the form, the model is evaluated on
held-out pairs (--eval_dataset_name), one yardstick.

The score head sits on the last real token (EOS), initialised N(0, 1/sqrt(d_model + 1)) (detail 6 of
docs/implementation_details.md; the steps below are numbered as its "reward.py" list). After training the
reward is normalised so the SFT demonstrations score 0 on average (detail 7), inside the saved weights:
`AutoModelForSequenceClassification.from_pretrained(output_dir)` gives the normalised score.
"""

import json
import math
import os
import time
from array import array
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

import common
import plumbing


@dataclass
class Args:
    # ---- algorithm ----
    learning_rate: float = 1e-3
    """peak AdamW learning rate (the world's 4M-parameter model; ~5e-6 for a real model)"""
    num_epochs: float = 1.5
    """passes over the training pairs"""
    max_steps: int | None = None
    """stop after this many steps (a cap for quick runs; the schedule follows it)"""
    batch_size: int = 64
    """pairs, rankings or judged responses per step (one optimizer step); under torchrun the global batch, split over
    the processes"""
    micro_batch_size: int = 64
    """pairs, rankings or judged responses per forward/backward pass of one process (2x, K x or 1x sequences), in
    training and evaluation"""
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
    center_rewards_coef: float = 0.0
    """weight of the reward-centering regulariser mean((r_c + r_r)^2) (pairs and rankings); 0.01 in Eisenstein et al."""
    rating_loss: Literal["regression", "ordinal"] = "regression"
    """how ratings train the reward: squared error to the centred rating, or the cumulative-logit (ordinal) model"""
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
    """the SFT model (hub id or local directory) whose backbone the reward model starts from"""
    dataset_name: str = "data/world/preference"
    """preference pairs {prompt, chosen, rejected}, rankings {prompt, responses} (best first), ratings {prompt,
    completion, rating} or thumbs {prompt, completion, label} (text or chat messages): hub id, directory or
    .json/.jsonl"""
    eval_dataset_name: str | None = None
    """pairs or rankings whose held-out split the reward model is evaluated on (default: dataset_name's; for ratings
    and thumbs, which hold no pairs, the world's data/world/preference)"""
    rating_scale: tuple[int, int] = (1, 7)
    """the lowest and highest rating of a ratings dataset (a rating outside them, or not a whole number, is an
    error)"""
    margin_column: str | None = None
    """a column of per-pair margins m: loss -log sigmoid(r_c - r_r - m)"""
    label_column: str | None = None
    """a column with the probability p that chosen is preferred (soft labels, e.g. from rlaif.py --mode label)"""
    sft_dataset_name: str = "data/world/sft"
    """demonstrations {prompt, completion} or {messages} whose mean reward is shifted to 0 after training"""
    num_normalisation_rows: int = 2000
    """demonstrations used to measure that mean"""
    max_length: int = 256
    """longest prompt + response in tokens; longer pairs are dropped (counted)"""
    # ---- evaluation ----
    eval_every: int = 125
    """steps between held-out evaluations"""
    num_eval_rows: int | None = 256
    """held-out pairs or rankings evaluated, every eval_every steps and at the end (the first of the eval split;
    None: all)"""
    gold_scorer: str | None = "data.gold:score"
    """the task's true score, "module:function" taking (prompts, responses) and returning one score each: how
    often the reward model orders held-out pairs as it does (the offline world's gold rater; None: off)"""
    log_every: int = 20
    """steps between logged training metrics"""
    # ---- run ----
    output_dir: str = "runs/reward"
    """where the reward model, tokenizer and eval.json are written (atomically)"""
    seed: int = 1
    """seed of the head's initialisation and of the data order"""
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


def preference_loss(chosen_rewards, rejected_rewards, margins=None, labels=None):
    """Bradley-Terry negative log-likelihood, -log sigmoid(r_c - r_r - m), per pair. With soft labels p it is
    the cross-entropy -p log sigmoid(d) - (1 - p) log sigmoid(-d): at p = 1 the hard-label loss."""
    d = chosen_rewards - rejected_rewards - (margins if margins is not None else 0)
    if labels is None:
        return -F.logsigmoid(d)
    return -labels * F.logsigmoid(d) - (1 - labels) * F.logsigmoid(-d)


class Ranking(NamedTuple):
    """A prompt's responses, best first, tokenised; a preference pair is the ranking (chosen, rejected)."""

    prompt: array
    responses: list[array]  # each ends with EOS
    extras: list[float]  # a pair's numeric columns (margin, soft label)
    row: int  # the row of the dataset it came from


def tokenize_rankings(tok, rows, columns, max_length: int, extra_columns=()) -> list[Ranking]:
    """Rankings of {prompt, responses} rows, or of {prompt, chosen, rejected} pairs; those with a prompt + response
    over max_length tokens are dropped (counted). Every row must rank the same number of responses."""
    if "responses" not in columns:
        pairs = common.tokenize_pairs(tok, rows, max_length, extra_columns)
        return [Ranking(x.prompt, [x.chosen, x.rejected], x.extras, x.row) for x in pairs]
    if extra_columns:
        plumbing.fail(f"--margin_column and --label_column are for pairs, not rankings ({', '.join(extra_columns)})")
    sizes = {len(r["responses"]) if isinstance(r["responses"], list) else 0 for r in rows}
    if len(sizes) > 1 or min(sizes) < 2:
        plumbing.fail(f"every ranking must list the same number (at least 2) of responses, got {sorted(sizes)}")
    out = []
    for i, row in enumerate(rows):
        p = common.encode_prompt(tok, row["prompt"])
        rs = [common.encode_completion(tok, row["prompt"], r) for r in row["responses"]]
        if len(p) + max(map(len, rs)) <= max_length:
            out.append(Ranking(array("i", p), [array("i", r) for r in rs], [], i))
    if len(out) < len(rows):
        print(f"note: {len(rows) - len(out)} of {len(rows)} rankings longer than max_length {max_length} dropped")
    if not out:
        plumbing.fail(f"no ranking fits in max_length {max_length}")
    return out


def sequence_rewards(model, seqs, pad_id, device):
    """Score at the last real token of each right-padded sequence (the head is read there: detail 6)."""
    return common.sequence_scores(model, *(t.to(device) for t in common.pad(seqs, pad_id)))


def ranking_rewards(model, rankings: list[Ranking], pad_id, device):
    """(B, K) rewards of the rankings' responses, all in one forward of B x K sequences (step 2)."""
    K = len(rankings[0].responses)
    r = sequence_rewards(model, [x.prompt + x.responses[k] for k in range(K) for x in rankings], pad_id, device)
    return r.view(K, len(rankings)).T


def ranking_loss(rewards, margins=None, labels=None):
    """Per ranking, the Bradley-Terry loss averaged over its K(K-1)/2 pairs (Ouyang et al. 2022, eq. 1), from (B, K)
    rewards of responses ranked best first. A ranking of two is a pair, where margins and soft labels apply."""
    i, j = torch.triu_indices(rewards.shape[1], rewards.shape[1], 1)  # every pair: i ranked above j
    margins, labels = (x[:, None] if x is not None else None for x in (margins, labels))
    return preference_loss(rewards[:, i], rewards[:, j], margins, labels).mean(1)


def ranked_pairs(rewards):
    """(better, worse): the rewards of every pair of the (B, K) rankings, flattened (for metrics)."""
    i, j = torch.triu_indices(rewards.shape[1], rewards.shape[1], 1)
    return rewards[:, i].flatten(), rewards[:, j].flatten()


def pair_metrics(chosen_rewards, rejected_rewards):
    """The pairwise metrics, as dpo.py reports them for its implicit reward (a tie counts as half right)."""
    right = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype) + 0.5 * (chosen_rewards == rejected_rewards)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": right.mean(),
    }


def is_whole(value) -> bool:
    """A whole number: an int, or a float such as 4.0 (a boolean is not one)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def thumbs_loss(rewards, labels):
    """Per response, the logistic loss of a binary classifier whose logit is the reward, P(up) = sigmoid(r):
    -log sigmoid(r) for a thumbs up (label 1), -log sigmoid(-r) for a thumbs down (label 0) (detail 31)."""
    return -labels * F.logsigmoid(rewards) - (1 - labels) * F.logsigmoid(-rewards)


def rating_loss(rewards, ratings, mean_rating: float, scale: tuple[int, int], loss_type: str = "regression"):
    """Per response (detail 31). regression: (r - (rating - mean_rating))^2. ordinal: -log P(rating | r) under the
    cumulative-logit model P(rating <= k) = sigmoid(c_k - r) (McCullagh 1980), the cut point c_k = k + 1/2 -
    mean_rating between the ratings k and k + 1. With cut points 1 apart, P(rating = k) = sigmoid(c_k - r) -
    sigmoid(c_{k-1} - r) = sigmoid(c_k - r) sigmoid(r - c_{k-1}) (1 - 1/e), computed in logs; the lowest rating
    has no lower cut point, the highest no upper one."""
    target = ratings - mean_rating
    if loss_type == "regression":
        return (rewards - target) ** 2
    low, high = scale
    at_most = torch.where(ratings < high, -F.logsigmoid(target + 0.5 - rewards), 0.0)  # -log sigmoid(c_k - r)
    above = torch.where(ratings > low, -F.logsigmoid(rewards - target + 0.5), 0.0)  # -log sigmoid(r - c_{k-1})
    return at_most + above - ((ratings > low) & (ratings < high)) * math.log(1 - math.exp(-1))


@torch.no_grad()
def last_hidden_states(model, seqs, pad_id, device):
    """The final (normalised) hidden state at each sequence's last real token: what the score head reads."""
    ids, mask = (t.to(device) for t in common.pad(seqs, pad_id))
    hidden = common.forward(model.base_model, ids, mask).last_hidden_state
    return hidden[torch.arange(len(seqs)), mask.sum(1) - 1].float()


def fold_shift_into_head(head: torch.nn.Linear, hidden: torch.Tensor) -> dict:
    """Make the mean reward of `hidden` (the demonstrations' last-token states) exactly 0 inside the weights.

    Decoder classification heads in transformers have no bias, so a constant cannot be added. Instead find v
    with v.h close to 1 for every demonstration (least squares; hidden states share a common direction),
    scaled so its mean over them is exactly 1, and set w <- w - mean_reward * v: rewards move by
    -mean_reward * (v.h), a constant shift up to the fit's residual, which is reported."""
    w = common.full_tensor(head.weight.detach())[0].float()
    scores = hidden @ w
    ones = torch.ones(len(hidden), 1, device=hidden.device)
    v = torch.linalg.lstsq(hidden, ones, driver="gelsd" if hidden.device.type == "cpu" else None).solution[:, 0]
    v = v / (hidden @ v).mean()
    shift = scores.mean()
    new_w = (w - shift * v).to(head.weight.dtype)
    common.assign(head.weight, new_w[None])
    return {
        "reward_mean_before_normalisation": float(shift),
        "reward_mean_after_normalisation": float((hidden @ new_w.float()).mean()),
        "normalisation_shift_residual_std": float((shift * (hidden @ v - 1)).std()),
    }


if __name__ == "__main__":
    # ---- TRY NOT TO MODIFY: arguments, seeding, device ------------------------------------------------
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "lora_alpha max_steps batch_size micro_batch_size adam_eps max_grad_norm log_every num_epochs "
            "max_length eval_every num_normalisation_rows num_eval_rows",
            "[0, inf)": "lora_r learning_rate weight_decay save_every warmup_steps center_rewards_coef",
            "[0, 1)": "lora_dropout adam_betas",
            "[0, 1]": "max_warmup_fraction",
            "(-inf, inf)": "seed rating_scale",
        },
    )
    if args.rating_scale[0] >= args.rating_scale[1]:
        plumbing.fail(f"--rating_scale must be the lowest rating, then a higher one, got {args.rating_scale}")
    plumbing.check_global_batch(args.batch_size)
    plumbing.seed_everything(args.seed)
    plumbing.check_output_dir(args, "reward.py")
    gold_scorer = plumbing.load_function(args.gold_scorer, "gold_scorer")
    device, autocast, use_compile, bf16 = plumbing.device_and_autocast(args.bf16, args.compile)
    log, history = plumbing.start_tracking(args, "reward")

    # ---- 1. data and model -------------------------------------------------------------------------------
    tok = common.load_tokenizer(args.model_name_or_path)
    extra = [c for c in (args.margin_column, args.label_column) if c]
    forms = {  # the feedback's form, by the data's columns
        "pairs": ["prompt", "chosen", "rejected", *extra],
        "rankings": ["prompt", "responses"],
        "ratings": ["prompt", "completion", "rating"],
        "thumbs": ["prompt", "completion", "label"],
    }
    train_rows, eval_rows, columns = common.load_splits(args.dataset_name, list(forms.values()), seed=args.seed)
    form = next(f for f, c in forms.items() if c == columns)
    unpaired = form in ("ratings", "thumbs")  # responses judged one at a time
    eval_name = args.eval_dataset_name
    if unpaired:
        if extra or args.center_rewards_coef:
            plumbing.fail(f"--margin_column, --label_column and --center_rewards_coef are for pairs, not {form}")
        low, high = args.rating_scale
        valid = {
            "ratings": (lambda v: is_whole(v) and low <= v <= high, f"a whole-number rating from {low} to {high}"),
            "thumbs": (lambda v: isinstance(v, bool), "a boolean (true for a thumbs up, false for down)"),
        }
        train = common.tokenize_unpaired(tok, train_rows, columns[-1], args.max_length, *valid[form])
        mean_rating = float(np.mean([x.value for x in train]))  # the regression's centre, the cut points' origin
        eval_name = eval_name or "data/world/preference"
        print(f"note: a reward model from {form} is evaluated on the held-out pairs of {eval_name}")
    else:
        train = tokenize_rankings(tok, train_rows, columns, args.max_length, extra)
    if eval_name:  # another dataset's held-out split, pairs or rankings
        accepted = [["prompt", "chosen", "rejected"], ["prompt", "responses"]]
        _, eval_rows, columns = common.load_splits(eval_name, accepted, seed=args.seed)
    eval_rows = eval_rows[: args.num_eval_rows]
    evals = tokenize_rankings(tok, eval_rows, columns, args.max_length)
    # the demonstrations of the normalisation (step 4), read now: a mistake in them fails before training
    accepted = [["prompt", "completion"], ["messages"]]
    demos, _, demo_columns = common.load_splits(args.sft_dataset_name, accepted, seed=args.seed)
    demos = demos[: args.num_normalisation_rows]
    seqs = [sum(common.encode_demonstration(tok, row, demo_columns), []) for row in demos]
    seqs = [s for s in seqs if len(s) <= args.max_length]
    if not seqs:
        plumbing.fail(f"no demonstration of {args.sft_dataset_name!r} fits in max_length {args.max_length}")
    model = plumbing.load_model(
        AutoModelForSequenceClassification, args.model_name_or_path, tok, device, new_head=True, num_labels=1
    )
    if not hasattr(model, "score") or model.score.out_features != 1:
        plumbing.fail(f"{args.model_name_or_path} does not give a one-output score head")
    # detail 6: a fresh head, N(0, 1/sqrt(d_model + 1)); the Llama-family head has no bias (it would be 0)
    torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
    model = common.add_lora(model, args, heads=["score"], bf16=bf16)  # with --lora_r: adapters and the head
    plumbing.shard_model(model)  # under torchrun: FSDP2
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    eval_kind = "pairs" if len(evals[0].responses) == 2 else f"rankings of {len(evals[0].responses)}"
    kind = form if unpaired else "pairs" if len(train[0].responses) == 2 else f"rankings of {len(train[0].responses)}"
    print(f"reward model: {n_params:.2f}M parameters; {len(train)} train {kind}, {len(evals)} eval {eval_kind}")
    forward_model = torch.compile(model) if use_compile else model

    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        plumbing.fail(f"{len(train)} training {kind} is fewer than one batch of {args.batch_size}")
    total_steps = math.ceil(args.num_epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    micro = min(args.micro_batch_size, args.batch_size)
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    trained = [p for p in model.parameters() if p.requires_grad]  # what is frozen is not in the optimizer
    optimizer = torch.optim.AdamW(trained, **adamw, fused=True)
    warmup = min(args.warmup_steps, int(total_steps * args.max_warmup_fraction))
    scheduler = common.warmup_cosine_schedule(optimizer, warmup, total_steps)

    @torch.inference_mode()
    def evaluate_pairs():
        """Held-out loss and pairwise metrics over every pair of the held-out pairs or rankings and, given a gold
        scorer, agreement with it (step 5)."""
        model.eval()
        local_evals, rewards_ = common.shard(evals), []  # under torchrun each rank scores its share
        for i in range(0, len(local_evals), micro):  # training's batch shape: no larger peak memory than training's
            with autocast:
                batch_rewards = ranking_rewards(forward_model, local_evals[i : i + micro], tok.pad_token_id, device)
                rewards_ += batch_rewards.tolist()
        model.train()
        held_out = torch.tensor(common.gather(rewards_)[: len(evals)], dtype=torch.double)
        better, worse = ranked_pairs(held_out)
        metrics = {"loss": ranking_loss(held_out).mean(), **pair_metrics(better, worse)}
        metrics = {k: float(v) for k, v in metrics.items()}
        if gold_scorer is not None:
            rows = [eval_rows[x.row] for x in evals]
            responses = [row.get("responses") or [row["chosen"], row["rejected"]] for row in rows]
            K = len(responses[0])
            prompts = [common.plain_text(row["prompt"]) for row in rows for _ in range(K)]
            texts = [common.plain_text(r) for rs in responses for r in rs]
            gold = torch.tensor(gold_scorer(prompts, texts)).view(-1, K)
            gold_better, gold_worse = ranked_pairs(gold.double())
            metrics["gold_agreement"] = float(
                ((better - worse).sign() == (gold_better - gold_worse).sign()).double().mean()
            )
            # the gold rater's own agreement with the noisy held-out labels: the ceiling for the accuracy
            metrics["gold_label_agreement"] = float(pair_metrics(gold_better, gold_worse)["rewards/accuracies"])
        return metrics

    # ---- ALGO LOGIC: training ------------------------------------------------------------------------------
    def loss_on(part):
        """A micro-batch's mean loss and, for pairs and rankings, its pair metrics (detached)."""
        if unpaired:
            # 2. each response alone, scored at its last real token
            with autocast:
                rewards = sequence_rewards(
                    forward_model, [x.prompt + x.completion for x in part], tok.pad_token_id, device
                )
            values = torch.tensor([x.value for x in part], device=device)
            # 3. thumbs: a classifier's logistic loss; ratings: regression or the ordinal loss (detail 31)
            if form == "thumbs":
                return thumbs_loss(rewards, values).mean(), {}
            return rating_loss(rewards, values, mean_rating, args.rating_scale, args.rating_loss).mean(), {}
        extras = torch.tensor([x.extras for x in part], device=device).reshape(len(part), len(extra))
        margins = extras[:, extra.index(args.margin_column)] if args.margin_column else None
        labels = extras[:, extra.index(args.label_column)] if args.label_column else None
        # 2. every response of the micro-batch in one forward (chosen and rejected: 2 x micro sequences), scored at
        # its last real token
        with autocast:
            rewards = ranking_rewards(forward_model, part, tok.pad_token_id, device)
        # 3. the Bradley-Terry loss (with margins, soft labels), per pair or averaged over a ranking's pairs, and the
        # centering regulariser
        loss = ranking_loss(rewards, margins, labels).mean()
        better, worse = ranked_pairs(rewards)
        if args.center_rewards_coef:
            loss = loss + args.center_rewards_coef * ((better + worse) ** 2).mean()
        return loss, pair_metrics(better.detach(), worse.detach())

    rng = np.random.default_rng(args.seed)
    lengths = [len(x.prompt) + (len(x.completion) if unpaired else max(map(len, x.responses))) for x in train]
    batches, step, elapsed = [], 0, 0.0
    if args.resume:
        state = plumbing.load_checkpoint(args.output_dir, {"model": model}, optimizer, scheduler)
        step, batches, elapsed, history[:] = state["step"], state["batches"], state["elapsed"], state["history"]
        rng.bit_generator.state = state["numpy_rng"]
    start = time.time() - elapsed
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="reward", mininterval=5)
    while step < total_steps:
        if not batches:  # a new epoch: shuffled batches of examples of similar length
            grouped = common.length_grouped_batches(lengths, args.batch_size, rng)
            batches = [[int(i) for i in b] for b in grouped if len(b) == args.batch_size]
        batch = [train[i] for i in batches.pop()]
        local_batch, stats = common.shard(batch), []  # under torchrun each rank takes its share of the batch
        for m in range(0, len(local_batch), micro):
            part = local_batch[m : m + micro]
            loss, train_metrics = loss_on(part)  # steps 2 and 3
            share = len(part) / len(batch)  # the micro-batch's share of the (whole) batch's means
            (loss * share).backward()
            stats.append(share * torch.stack([loss.detach(), *train_metrics.values()]))
        stats = common.reduce_sum(torch.stack(stats).sum(0))  # the batch's means
        step += 1
        grad_norm = common.clip_grad_norm(trained, args.max_grad_norm)
        if plumbing.finite_or_stop(stats[0] + grad_norm, "loss", step, args.skip_nonfinite):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update()

        # ---- TRY NOT TO MODIFY: logging, periodic evaluation, checkpoints ---------------------------------
        if step % args.log_every == 0 or step == total_steps:
            loss_value, *means = stats.tolist()
            metrics = {
                "train/loss": loss_value,
                **dict(zip(train_metrics, means, strict=True)),
                "train/grad_norm": float(grad_norm),
                "train/lr": scheduler.get_last_lr()[0],
            }
            accuracy = metrics.get("rewards/accuracies")  # pairs and rankings
            progress.set_postfix(loss=f"{loss_value:.3f}", acc="-" if accuracy is None else f"{accuracy:.2f}")
            log(metrics, step)
        if step % args.eval_every == 0 and step < total_steps:
            metrics = evaluate_pairs()
            tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            log({f"eval/{k}": v for k, v in metrics.items()}, step)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            state = {"step": step, "batches": batches, "numpy_rng": rng.bit_generator.state, "history": history}
            state["elapsed"] = time.time() - start
            plumbing.save_checkpoint(args.output_dir, "reward.py", args, {"model": model}, optimizer, scheduler, state)
    progress.close()
    train_seconds = time.time() - start

    # ---- 4. normalisation: the SFT demonstrations' mean reward becomes 0 (detail 7) ------------------------
    model.eval()
    local_seqs, hidden = common.shard(seqs), []  # under torchrun each rank its share of the demonstrations
    with torch.inference_mode(), autocast:
        for i in range(0, len(local_seqs), 2 * micro):
            hidden += last_hidden_states(model, local_seqs[i : i + 2 * micro], tok.pad_token_id, device).tolist()
    normalisation = fold_shift_into_head(model.score, torch.tensor(common.gather(hidden)[: len(seqs)], device=device))

    # ---- 5. evaluation ----------------------------------------------------------------------------------
    results = {**evaluate_pairs(), **normalisation, "steps": step, "train_seconds": round(train_seconds, 1)}
    print(json.dumps(results, indent=2))
    log({f"eval/{k}": v for k, v in results.items()}, step)

    # ---- TRY NOT TO MODIFY: saving ---------------------------------------------------------------------------
    weights = plumbing.full_state_dict(model)  # under torchrun gathered from the shards; None in one process

    def write(tmp):
        plumbing.save_model(model, tmp, weights)
        tok.save_pretrained(tmp)
        plumbing.write_json(os.path.join(tmp, "eval.json"), results)
        plumbing.write_jsonl(os.path.join(tmp, "metrics.jsonl"), history)

    plumbing.write_atomic(args.output_dir, "reward.py", args, write)
    print(f"saved {args.output_dir}")
