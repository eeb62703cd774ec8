"""RL from AI feedback: an LLM labeller, guided by a written constitution, replaces the human comparisons.

    python rlaif.py                             # online: OAIF on the offline world, judged by data/world/judge_model
    python rlaif.py --mode label --dataset_name data/world/preference --output_dir runs/rlaif_labels
    python reward.py --dataset_name runs/rlaif_labels --label_column label --output_dir runs/reward_rlaif

The labeller (Bai et al. 2022, "Constitutional AI"; Lee et al. 2023, "RLAIF vs. RLHF") is any causal LM. It reads
a preamble, one principle drawn from the constitution for this comparison, the prompt and two responses, and is
asked "Which response is better? Answer A or B." Its preference is the softmax over its log-probs of the two
answer tokens; position bias is removed by asking again with the responses swapped and averaging:
p(y1 better) = (p("A" | A = y1, B = y2) + p("B" | A = y2, B = y1)) / 2 (details 20-23 of
docs/implementation_details.md; the steps below are numbered as its "rlaif.py" lists them). With --judge_mode
direct (d-RLAIF, Lee et al. 2023; detail 24) it rates each response alone from 1 to 9 under a question of
--rating_constitution: a rating is the expected digit under its softmax over the nine digits, and
p(y1 better) = sigmoid(rating(y1) - rating(y2)), for labellers whose pairwise answer only follows the position.

  --mode online  Online AI Feedback (Guo et al. 2024): for each prompt, two samples from the current policy, the
                 labeller picks one, and a DPO-family update learns from that fresh pair (the reference is the
                 SFT policy). An episode is a prompt and its two samples.
  --mode label   labels pairs, given ({prompt, chosen, rejected}) or sampled from the policy for {prompt} rows,
                 and writes a preference dataset with a soft `label` column (p(chosen is better) >= 0.5) that
                 reward.py (--label_column label) and dpo.py read: distilled RLAIF.

Reported: the labeller's agreement with the gold scorer or given labels, how often its choice flips when the order
is swapped, its mean confidence. Constitutional AI's first stage (critique and revision) is sl_cai.py.
"""

import json
import os
import random
import sys
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

PREAMBLE = "You compare two responses to the same prompt."
DIRECT_PREAMBLE = "You rate a response to a prompt."  # --judge_mode direct
RATINGS = "123456789"


def judge_query(preamble, principle, prompt, a, b):
    """The labeller's question about one ordered pair (responses are shown as they continue the prompt)."""
    return (
        f"{preamble}\nPrinciple: {principle}\nPrompt: {prompt}\nResponse A:{a}\nResponse B:{b}\n"
        "Which response is better? Answer A or B."
    )


def rating_query(preamble, principle, prompt, response):
    """The labeller's question about one response alone (--judge_mode direct): the principle asks it, 1 to 9."""
    return f"{preamble}\n\nPrompt: {prompt.strip()}\nResponse: {response.strip()}\n\n{principle} Answer with one digit."


@dataclass
class Args:
    mode: Literal["online", "label"] = "online"
    """online: OAIF training of the policy; label: write an AI-labelled preference dataset"""
    # ---- algorithm ----
    constitution: str = "data/world/constitution.txt"
    """the pairwise labeller's principles: a text file, one per line, or a JSON list of strings"""
    rating_constitution: str = "data/world/rating_constitution.txt"
    """--judge_mode direct: the principles as questions about one response with a scale of 1 to 9 (the same format)"""
    judge_mode: Literal["pairwise", "direct"] = "pairwise"
    """pairwise: the labeller compares the two responses, asked in both orders; direct (d-RLAIF): it rates each
    response alone from 1 to 9, and p(first better) = sigmoid(rating difference)"""
    preamble: str | None = None
    """the first line of every question to the labeller (None: PREAMBLE, or DIRECT_PREAMBLE in direct mode)"""
    total_episodes: int = 6144
    """online: episodes (prompts, each with two samples) in all"""
    max_steps: int | None = None
    """online: stop after this many steps; the learning-rate schedule follows it"""
    batch_size: int = 64
    """online: episodes per step (one optimizer step on their fresh pairs), under torchrun the global batch split
    over the processes"""
    micro_batch_size: int = 32
    """online: pairs per forward/backward pass of one process (gradient accumulation)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """online: DPO (sigmoid; summed log-probs) or IPO (per-token average log-probs, as dpo.py) on the labelled pair"""
    beta: float = 0.1
    """online: the KL strength of the DPO-family loss"""
    learning_rate: float = 1e-4
    """online: AdamW learning rate, annealed linearly to 0 (higher than dpo.py's: far fewer steps)"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """online: AdamW betas (torch's defaults, as the reference implementations use them)"""
    adam_eps: float = 1e-5
    """online: AdamW epsilon (detail 15)"""
    weight_decay: float = 0.01
    """online: AdamW weight decay (torch's default)"""
    max_grad_norm: float = 1.0
    """online: gradient clipping"""
    response_length: int = 64
    """longest sampled response of a pair in tokens (online, and label mode for {prompt} rows)"""
    rollout_temperature: float = 1.0
    """temperature of the two samples per prompt (online, and label mode for {prompt} rows)"""
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
    """the policy (online: trained, and the frozen reference; label: samples the pairs of {prompt} rows)"""
    judge_model_name_or_path: str = "data/world/judge_model"
    """the AI labeller: any causal LM (the offline world's: sft.py trained on data/world/judge)"""
    dataset_name: str = "data/world/prompts"
    """online: prompts {prompt}; label: pairs {prompt, chosen, rejected} or prompts {prompt}"""
    max_prompt_length: int = 128
    """longest prompt to sample from in tokens (online, label mode for {prompt} rows); longer ones dropped"""
    judge_max_length: int = 512
    """longest labeller question in tokens; longer ones count as ties and are skipped"""
    judge_batch_size: int = 64
    """questions per labeller forward"""
    max_label_rows: int | None = None
    """label: label at most this many rows of each split"""
    sample_batch_size: int = 64
    """label: {prompt} rows whose pairs are sampled at once (by each process)"""
    # ---- evaluation ----
    eval_every: int = 24
    """online: steps between evaluations on held-out prompts"""
    num_periodic_eval_prompts: int = 64
    """online: held-out prompts of the evaluations every eval_every steps (the first of the num_eval_prompts)"""
    num_eval_prompts: int = 256
    """online: held-out prompts sampled from the policy and the reference at the end"""
    max_new_tokens: int = 64
    """online: longest evaluation sample in tokens"""
    eval_temperature: float = 0.7
    """online: sampling temperature of the evaluation samples (the same in dpo.py, ppo.py and rlaif.py)"""
    eval_batch_size: int = 64
    """online: prompts sampled at once in evaluation"""
    gold_scorer: str | None = "data.gold:score"
    """the task's true score of responses, "module:function" taking (prompts, responses) and returning one score
    each: the labeller's agreement with it, and the evaluation (the offline world's gold rater; None: off)"""
    probe: str | None = "data.sycophancy:probe"
    """online: held-out metrics of the eval prompts' own fields, "module:function" (rows, responses) -> metrics:
    by default the world's sycophancy probe, which reports nothing for prompts without its fields; None: off"""
    log_every: int = 4
    """online: steps between logged training metrics"""
    # ---- run ----
    output_dir: str = "runs/rlaif"
    """online: the trained policy; label: the labelled dataset (train.jsonl, test.jsonl)"""
    seed: int = 1
    """seed of sampling, principle choice and data order"""
    save_every: int = 0
    """online: write a checkpoint (policy, optimizer, RNG, data position) every this many steps; 0: never"""
    resume: bool = False
    """online: continue from the checkpoint in --output_dir"""
    skip_nonfinite: bool = False
    """online: skip a batch whose loss is not finite instead of stopping"""
    bf16: bool | None = None
    """bf16 autocast (--bf16 True/False); by default on with CUDA, off on the CPU"""
    compile: bool | None = None
    """torch.compile the policy's training forward (--compile True/False); by default on with CUDA, off on the CPU"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf-reference"
    """wandb project name"""


# ---- the labeller -------------------------------------------------------------------------------------
def load_constitution(path, flag):
    """The principles of a text file (one per line) or a JSON list of strings."""
    text = plumbing.read_text(path, flag)
    try:
        principles = json.loads(text) if path.endswith(".json") else [x.strip() for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        plumbing.fail(f"{flag} {path!r} is not valid JSON: {e}")
    if not isinstance(principles, list) or not principles or not all(isinstance(p, str) and p for p in principles):
        plumbing.fail(f"{flag} {path!r} holds no principles (a text file, one per line, or a JSON list of strings)")
    return principles


def answer_token_ids(tok, answers=("A", "B")):
    """The first token id of each answer ("A" and "B", or a rating's digits) as the labeller would write it."""
    question = [{"role": "user", "content": "?"}]
    ids = []
    for answer in answers:
        if tok.chat_template:
            ids.append(common.encode_completion(tok, question, [{"role": "assistant", "content": answer}])[0])
        else:
            ids.append(tok(" " + answer, add_special_tokens=False)["input_ids"][0])
    if len(set(ids)) < len(ids):
        plumbing.fail(f"the labeller's tokenizer does not tell the answers {list(answers)} apart by their first token")
    return ids


def encode_question(tok, text):
    """A question as the labeller reads it: through its chat template when it has one."""
    if tok.chat_template:
        return common.encode_prompt(tok, [{"role": "user", "content": text}])
    return tok(text + "\nAnswer:")["input_ids"]


@torch.inference_mode()
def answer_logprobs(judge, questions, answer_ids, pad_id, device, batch_size, autocast):
    """log-softmax over the answer tokens after each question: (N, number of answers)."""
    out = []
    for i in range(0, len(questions), batch_size):
        ids, mask = (t.to(device) for t in common.pad(questions[i : i + batch_size], pad_id, "left"))
        with autocast:
            logits = common.forward(judge, ids, mask, logits_to_keep=1).logits[:, -1].float()
        out.append(logits[:, answer_ids].log_softmax(-1))
    return torch.cat(out)


def debiased_preference(logprobs_ab, logprobs_ba):
    """p(the first response is better), averaged over both orders (it is shown as A, then as B): a labeller that
    always answers "A" gives p = 0.5, no preference."""
    return 0.5 * (logprobs_ab.exp()[:, 0] + logprobs_ba.exp()[:, 1])


def label_pairs(judge, judge_tok, prompt_texts, firsts, seconds, principles, rng, args, device, autocast):
    """The labeller's debiased p(first better) for each pair, and whether its choice flipped with the order.
    Questions over judge_max_length give p = 0.5 and are marked in `skipped`."""
    chosen_principles = [rng.choice(principles) for _ in prompt_texts]  # one principle per comparison
    pairs = list(zip(chosen_principles, prompt_texts, firsts, seconds, strict=True))
    preamble = args.preamble or PREAMBLE
    ab = [encode_question(judge_tok, judge_query(preamble, c, p, a, b)) for c, p, a, b in pairs]
    ba = [encode_question(judge_tok, judge_query(preamble, c, p, b, a)) for c, p, a, b in pairs]
    skipped = torch.tensor([max(len(x), len(y)) > args.judge_max_length for x, y in zip(ab, ba, strict=True)])
    ab, ba = ([q[-args.judge_max_length :] for q in qs] for qs in (ab, ba))  # cut to fit; their p is set to 0.5
    answers = answer_token_ids(judge_tok)
    lp_ab = answer_logprobs(judge, ab, answers, judge_tok.pad_token_id, device, args.judge_batch_size, autocast)
    lp_ba = answer_logprobs(judge, ba, answers, judge_tok.pad_token_id, device, args.judge_batch_size, autocast)
    p = debiased_preference(lp_ab, lp_ba).cpu()
    # the choice flips when the first response wins in one order and loses in the other
    flipped = ((lp_ab[:, 0] > lp_ab[:, 1]) != (lp_ba[:, 1] > lp_ba[:, 0])).cpu()
    p[skipped] = 0.5
    return p, flipped & ~skipped, skipped


def rate_pairs(judge, judge_tok, prompt_texts, firsts, seconds, principles, rng, args, device, autocast):
    """d-RLAIF (Lee et al. 2023, detail 24): each response rated alone, the expected digit sum_k k p(k) under the
    softmax over the digits 1-9; p(first better) = sigmoid(rating(first) - rating(second)); nothing flips."""
    chosen_principles = [rng.choice(principles) for _ in prompt_texts]  # one principle per comparison
    preamble = args.preamble or DIRECT_PREAMBLE
    questions = [
        encode_question(judge_tok, rating_query(preamble, c, p, y))
        for c, p, a, b in zip(chosen_principles, prompt_texts, firsts, seconds, strict=True)
        for y in (a, b)
    ]
    skipped = torch.tensor([len(q) > args.judge_max_length for q in questions]).view(-1, 2).any(1)
    questions = [q[-args.judge_max_length :] for q in questions]  # cut to fit; their p is set to 0.5
    digits = answer_token_ids(judge_tok, RATINGS)
    lp = answer_logprobs(judge, questions, digits, judge_tok.pad_token_id, device, args.judge_batch_size, autocast)
    ratings = (lp.exp() * torch.arange(1, 10, device=lp.device)).sum(1).view(-1, 2).cpu()
    p = torch.sigmoid(ratings[:, 0] - ratings[:, 1])
    p[skipped] = 0.5
    return p, torch.zeros_like(skipped), skipped


def labeller_metrics(p, flipped, skipped, reference_first_better=None):
    """Agreement with a reference (gold rater or given labels; its ties count half), flip rate and mean confidence
    over the labelled pairs; and the share of questions skipped (over judge_max_length)."""
    keep = ~skipped
    metrics = {
        "labeller_flip_rate": float(flipped[keep].float().mean()),
        "labeller_confidence": float(torch.maximum(p, 1 - p)[keep].mean()),
        "labeller_skip_rate": float(skipped.float().mean()),
    }
    if reference_first_better is not None:
        ref = torch.as_tensor(reference_first_better, dtype=torch.float)[keep]
        agree = ((p[keep] > 0.5).float() == ref).float()
        metrics["agreement"] = float(torch.where(ref == 0.5, torch.full_like(agree, 0.5), agree).mean())
    return metrics


def gold_first_better(gold_scorer, prompts, firsts, seconds):
    """1 where the gold scorer prefers the first response, 0 where the second, 0.5 for a tie."""
    g1, g2 = np.array(gold_scorer(prompts, firsts)), np.array(gold_scorer(prompts, seconds))
    return (g1 > g2) + 0.5 * (g1 == g2)


@torch.inference_mode()
def sample_pairs(policy, tok, prompt_ids, args, device, autocast):
    """Two responses per prompt from the policy: (first_ids, second_ids) lists, each cut after its EOS."""
    ids, mask = (t.to(device) for t in common.pad(prompt_ids, tok.pad_token_id, "left"))
    ids, mask, eos = ids.repeat(2, 1), mask.repeat(2, 1), tok.eos_token_id
    with autocast, common.gathered(policy):  # under torchrun the whole policy, on each rank's own prompts
        raw = common.sample(policy, ids, mask, args.response_length, args.rollout_temperature, eos, stop_at_eos=True)
    responses, response_mask, _ = common.truncate_after_eos(raw, eos, tok.pad_token_id)
    lists = [r[: int(n)].tolist() for r, n in zip(responses.cpu(), response_mask.sum(1).cpu(), strict=True)]
    return lists[: len(prompt_ids)], lists[len(prompt_ids) :]


def dpo_losses(logps, ref_logps, lengths, n, loss_type, beta):
    """Per-pair losses and log-ratio differences h of DPO (Rafailov et al. 2023, eq. 7; summed log-probs) or IPO
    (Azar et al. 2023, eq. 17; per-token averages), as dpo.py (detail 18): the first n rows chosen, then rejected."""
    ratios = (logps - ref_logps) / (lengths if loss_type == "ipo" else 1)
    h = ratios[:n] - ratios[n:]
    return (-F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2), h


# ---- ALGO LOGIC: label mode, a labelled dataset ---------------------------------------------------------
def label_dataset(args, ask_labeller, gold_scorer, device, autocast):
    """Label every pair of each split (given, or two samples of the policy per prompt) and write
    {prompt, chosen, rejected, label} rows: distilled RLAIF."""
    accepted = [["prompt", "chosen", "rejected"], ["prompt"]]  # pairs, or prompts to sample pairs for
    train_rows, eval_rows, columns = common.load_splits(args.dataset_name, accepted, seed=args.seed)
    policy = None
    if columns == ["prompt"]:  # only prompts: the policy samples the pairs (given pairs need no policy)
        tok = common.load_tokenizer(args.model_name_or_path)
        policy = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device).eval()
        plumbing.shard_model(policy.requires_grad_(False))  # under torchrun: FSDP2
    results, splits = {}, {}
    for split, rows in (("train", train_rows), ("test", eval_rows)):
        rows = rows[: args.max_label_rows or len(rows)]
        # 1. the pairs: as given, or two samples per prompt (prompts over max_prompt_length dropped, counted)
        if policy is None:
            firsts, seconds = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
        else:
            prompt_ids, kept = common.encode_prompts(tok, rows, args.max_prompt_length, split)
            rows, prompt_ids, firsts, seconds = [rows[i] for i in kept], common.shard(prompt_ids), [], []
            for i in tqdm(range(0, len(prompt_ids), args.sample_batch_size), desc=f"sampling {split}", mininterval=5):
                a, b = sample_pairs(policy, tok, prompt_ids[i : i + args.sample_batch_size], args, device, autocast)
                firsts += tok.batch_decode(a, skip_special_tokens=True)
                seconds += tok.batch_decode(b, skip_special_tokens=True)
            # under torchrun each rank sampled its share of the prompts
            firsts, seconds = (common.gather(x)[: len(rows)] for x in (firsts, seconds))
        prompts = [r["prompt"] for r in rows]
        # 2. the labeller's debiased preference, and how it agrees with the given labels and the gold scorer
        texts = [common.shard([common.plain_text(x) for x in xs]) for xs in (prompts, firsts, seconds)]  # this rank's
        chunks = range(0, len(texts[0]), 512)  # in chunks, so that the progress shows
        labels = [
            ask_labeller(*(t[i : i + 512] for t in texts)) for i in tqdm(chunks, f"labelling {split}", mininterval=5)
        ]
        p, flipped, skipped = (
            torch.tensor(common.gather(torch.cat(x).tolist())[: len(rows)]) for x in zip(*labels, strict=True)
        )
        texts = [[common.plain_text(x) for x in xs] for xs in (prompts, firsts, seconds)]
        metrics = labeller_metrics(p, flipped, skipped)
        if policy is None:  # agreement with the labels the data came with (chosen was preferred)
            metrics["label_agreement"] = labeller_metrics(p, flipped, skipped, torch.ones(len(p)))["agreement"]
        if gold_scorer is not None:
            gold = gold_first_better(gold_scorer, *texts)
            metrics["gold_agreement"] = labeller_metrics(p, flipped, skipped, gold)["agreement"]
        results.update({f"{split}_{k}": v for k, v in metrics.items()})
        # 3. chosen = the labeller's pick; label = its probability that chosen is better (>= 0.5)
        labelled = zip(prompts, firsts, seconds, p.tolist(), skipped.tolist(), strict=True)
        picked = [(q, a, b, pa) if pa >= 0.5 else (q, b, a, 1 - pa) for q, a, b, pa, s in labelled if not s]
        splits[split] = [{"prompt": q, "chosen": c, "rejected": r, "label": round(pc, 4)} for q, c, r, pc in picked]
        if not splits[split]:
            plumbing.fail(f"{split}: every labeller question is over --judge_max_length {args.judge_max_length}")
    print(json.dumps(results, indent=2))

    def write(tmp):
        for split, rows in splits.items():
            plumbing.write_jsonl(os.path.join(tmp, f"{split}.jsonl"), rows)
        plumbing.write_json(os.path.join(tmp, "labelling.json"), results)

    plumbing.write_atomic(args.output_dir, "rlaif.py", args, write)
    print(f"saved {args.output_dir}: {len(splits['train'])} train / {len(splits['test'])} test labelled pairs")


if __name__ == "__main__":
    # ---- TRY NOT TO MODIFY: arguments, seeding, device, the labeller ----------------------------------
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "lora_alpha total_episodes max_steps batch_size micro_batch_size beta adam_eps max_grad_norm "
            "response_length rollout_temperature max_prompt_length judge_max_length judge_batch_size "
            "max_label_rows sample_batch_size eval_every num_periodic_eval_prompts num_eval_prompts "
            "max_new_tokens eval_temperature eval_batch_size log_every",
            "[0, inf)": "lora_r learning_rate weight_decay save_every",
            "[0, 1)": "lora_dropout adam_betas",
            "(-inf, inf)": "seed",
        },
    )
    if args.mode == "online":
        plumbing.check_global_batch(args.batch_size)
    plumbing.seed_everything(args.seed)
    plumbing.check_output_dir(args, "rlaif.py")
    gold_scorer = plumbing.load_function(args.gold_scorer, "gold_scorer")
    device, autocast, use_compile, bf16 = plumbing.device_and_autocast(args.bf16, args.compile, kernel_cache=32)
    rng = random.Random(args.seed)  # the principle of each comparison
    flag = "rating_constitution" if args.judge_mode == "direct" else "constitution"  # questions, or principles
    principles = load_constitution(getattr(args, flag), f"--{flag}")
    judge_dtype = torch.bfloat16 if bf16 else torch.float32  # the labeller only scores
    judge_tok = common.load_tokenizer(args.judge_model_name_or_path)
    judge = plumbing.load_model(AutoModelForCausalLM, args.judge_model_name_or_path, judge_tok, device, judge_dtype)
    plumbing.shard_model(judge.eval().requires_grad_(False))  # under torchrun: FSDP2
    common.seed_sampling(args.seed)
    answer_token_ids(judge_tok, RATINGS if args.judge_mode == "direct" else "AB")  # can it answer? (else: one line)

    def ask_labeller(prompts, firsts, seconds):
        """The labeller's p(first better), flips and skips of text pairs (details 20-22, or 24 when direct)."""
        labeller = label_pairs if args.judge_mode == "pairwise" else rate_pairs
        return labeller(judge, judge_tok, prompts, firsts, seconds, principles, rng, args, device, autocast)

    if args.mode == "label":  # distilled RLAIF: the labelled dataset is the output
        label_dataset(args, ask_labeller, gold_scorer, device, autocast)
        sys.exit()

    # ---- TRY NOT TO MODIFY: online mode's data and models ---------------------------------------------
    log, history = plumbing.start_tracking(args, "rlaif_online")
    train_rows, eval_rows, _ = common.load_splits(args.dataset_name, [["prompt"]], seed=args.seed)
    tok = common.load_tokenizer(args.model_name_or_path)
    prompts, kept = common.encode_prompts(tok, train_rows, args.max_prompt_length)
    prompt_texts = [common.plain_text(train_rows[i]["prompt"]) for i in kept]
    eval_prompts, kept = common.encode_prompts(tok, eval_rows[: args.num_eval_prompts], args.max_prompt_length, "eval")
    probe = common.bind_probe(plumbing.load_function(args.probe, "probe"), [eval_rows[i] for i in kept])
    policy = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    policy = common.add_lora(policy, args, bf16=bf16)  # with --lora_r: adapters trained, the rest frozen
    if args.lora_r:  # the reference: the policy with its adapters off (detail 30), or a copy in its dtype (detail 26)
        ref_policy = common.WithoutAdapters(policy)
    else:
        ref_policy = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
        plumbing.shard_model(ref_policy.eval().requires_grad_(False))
    # dropout off: the log-probs of the update are those of the policy that sampled; under torchrun: FSDP2
    plumbing.shard_model(policy.eval())
    forward_policy = torch.compile(policy) if use_compile else policy
    num_steps = args.total_episodes // args.batch_size
    if args.max_steps is not None:
        num_steps = min(num_steps, args.max_steps)
    if num_steps == 0 or len(prompts) < args.batch_size:
        episodes = f"total_episodes {args.total_episodes} / {len(prompts)} prompts"
        plumbing.fail(f"{episodes} give no batch of {args.batch_size}")
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    trained = [p for p in policy.parameters() if p.requires_grad]  # what is frozen is not in the optimizer
    optimizer = torch.optim.AdamW(trained, **adamw, fused=True)
    print(f"online AI feedback: {num_steps} steps of {args.batch_size} prompts x 2 samples")

    def evaluate_policy(n):
        return common.evaluate(
            policy, tok, eval_prompts[:n], args, autocast, ref=ref_policy, gold_scorer=gold_scorer, probe=probe
        )

    order, curve, labeller_stats, first_step, elapsed = [], [], [], 1, 0.0
    data_rng = np.random.default_rng(args.seed)
    if args.resume:
        state = plumbing.load_checkpoint(args.output_dir, {"policy": policy}, optimizer, None)
        order, curve, labeller_stats = state["order"], state["curve"], state["labeller_stats"]
        elapsed, history[:], first_step = state["elapsed"], state["history"], state["step"] + 1
        data_rng.bit_generator.state = state["numpy_rng"]
        rng.setstate(state["principle_rng"])
    start = time.time() - elapsed
    progress = tqdm(total=num_steps, initial=first_step - 1, desc="rlaif", mininterval=5)

    # ---- ALGO LOGIC: online AI feedback, one DPO-family step on each batch's fresh labelled pairs -------
    for step in range(first_step, num_steps + 1):
        optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - (step - 1) / num_steps)
        if len(order) < args.batch_size:
            order = [int(i) for i in data_rng.permutation(len(prompts))]
        idx = common.shard([order.pop() for _ in range(args.batch_size)])  # under torchrun, this rank's share
        batch = [prompts[i] for i in idx]

        # 1. two fresh samples per prompt from the current policy
        firsts, seconds = sample_pairs(policy, tok, batch, args, device, autocast)
        texts = [
            [prompt_texts[i] for i in idx],
            tok.batch_decode(firsts, skip_special_tokens=True),
            tok.batch_decode(seconds, skip_special_tokens=True),
        ]
        # 2. the labeller's debiased preference, one principle per pair
        p, flipped, skipped = ask_labeller(*texts)
        gold = gold_first_better(gold_scorer, *texts).tolist() if gold_scorer is not None else None
        every_rank = [torch.tensor(common.gather(x.tolist())) for x in (p, flipped, skipped)]
        labeller_stats.append(labeller_metrics(*every_rank, common.gather(gold) if gold is not None else None))
        # a pair whose question was too long for the labeller weighs 0 (every rank still runs as many passes)
        weights = (~skipped).float().to(device)
        n_kept = float(common.reduce_sum(weights.sum()))
        if n_kept == 0:
            too_long = f"every labeller question is over --judge_max_length {args.judge_max_length}"
            plumbing.fail(f"step {step}: {too_long}: nothing to learn from")
        ordered = [(a, b) if pa >= 0.5 else (b, a) for a, b, pa in zip(firsts, seconds, p.tolist(), strict=True)]
        chosen, rejected = (list(x) for x in zip(*ordered, strict=True))

        # 3. one DPO-family step on the labelled pairs, against the frozen SFT reference
        sums = torch.zeros(3, device=device)  # loss, margins and accuracies, summed over kept pairs
        for m in range(0, len(batch), args.micro_batch_size):
            sl = slice(m, m + args.micro_batch_size)
            both_prompts, both = batch[sl] * 2, chosen[sl] + rejected[sl]
            with torch.inference_mode(), autocast:
                ref_logps = common.completion_logps(ref_policy, both_prompts, both, tok.pad_token_id, device)[0]
            with autocast:
                logps, lengths = common.completion_logps(forward_policy, both_prompts, both, tok.pad_token_id, device)
            n_pairs = len(chosen[sl])
            losses, h = dpo_losses(logps.float(), ref_logps.float(), lengths, n_pairs, args.loss_type, args.beta)
            w = weights[sl]
            ((losses * w).sum() / n_kept).backward()  # divided by the whole batch's count: ranks' gradients add up
            margins = args.beta * h.detach()
            sums += torch.stack([(losses.detach() * w).sum(), (margins * w).sum(), ((margins > 0) * w).sum()])
        loss_value, mean_margin, accuracy = (common.reduce_sum(sums) / n_kept).tolist()
        grad_norm = common.clip_grad_norm(trained, args.max_grad_norm)
        if plumbing.finite_or_stop(grad_norm + loss_value, "loss", step, args.skip_nonfinite):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- TRY NOT TO MODIFY: logging, periodic evaluation, checkpoints ----
        if step % args.log_every == 0 or step == num_steps:
            recent = {
                k.removeprefix("labeller_"): float(np.mean([s[k] for s in labeller_stats[-args.log_every :]]))
                for k in labeller_stats[-1]
            }
            metrics = {"train/loss": loss_value, "rewards/margins": mean_margin, "rewards/accuracies": accuracy}
            metrics.update({"train/grad_norm": float(grad_norm), "train/lr": optimizer.param_groups[0]["lr"]})
            metrics.update({f"labeller/{k}": v for k, v in recent.items()})
            progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", agree=f"{recent.get('agreement', np.nan):.2f}")
            log(metrics, step)
        if step % args.eval_every == 0 and step < num_steps:
            metrics, _ = evaluate_policy(args.num_periodic_eval_prompts)
            curve.append({"step": step, "episodes": step * args.batch_size, **metrics})
            tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            log({f"eval/{k}": v for k, v in metrics.items()}, step)
        if args.save_every and step % args.save_every == 0 and step < num_steps:
            state = dict(step=step, order=order, curve=curve, labeller_stats=labeller_stats, history=history)
            state.update(
                numpy_rng=data_rng.bit_generator.state, principle_rng=rng.getstate(), elapsed=time.time() - start
            )
            plumbing.save_checkpoint(args.output_dir, "rlaif.py", args, {"policy": policy}, optimizer, None, state)
        progress.update()
    progress.close()
    train_seconds = time.time() - start

    # ---- 4. evaluation against the reference, with the labeller's figures over the whole run ----
    metrics, samples = evaluate_policy(args.num_eval_prompts)
    episodes = num_steps * args.batch_size
    curve.append({"step": num_steps, "episodes": episodes, **metrics})
    labeller = {k: float(np.mean([s[k] for s in labeller_stats])) for k in labeller_stats[0]}
    if "agreement" in labeller:
        labeller["labeller_gold_agreement"] = labeller.pop("agreement")
    results = {**metrics, **labeller, "steps": num_steps, "episodes": episodes}
    results["train_seconds"] = round(train_seconds, 1)
    print(json.dumps(results, indent=2))
    for s in samples[:4]:
        print(f"  {s['prompt']} ->{s['response']}" + (f"   [gold {s['gold']}]" if "gold" in s else ""))
    log({f"eval/{k}": v for k, v in results.items()}, num_steps)

    # ---- TRY NOT TO MODIFY: saving ----
    weights = plumbing.full_state_dict(policy)  # under torchrun gathered from the shards; None in one process

    def write(tmp):
        plumbing.save_model(policy, tmp, weights)
        tok.save_pretrained(tmp)
        for name, rows in (("samples.jsonl", samples), ("curve.jsonl", curve), ("metrics.jsonl", history)):
            plumbing.write_jsonl(os.path.join(tmp, name), rows)
        plumbing.write_json(os.path.join(tmp, "eval.json"), results)

    plumbing.write_atomic(args.output_dir, "rlaif.py", args, write)
    print(f"saved {args.output_dir}")
