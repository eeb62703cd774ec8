"""Constitutional AI's first stage (SL-CAI, Bai et al. 2022, section 3): the model critiques and revises its own
responses under written requests, and the final revisions become a dataset for sft.py.

    python sl_cai.py --model_name_or_path runs/real/smollm2 --dataset_name runs/real/world_chat/prompts
    python sft.py --model_name_or_path runs/real/smollm2 --dataset_name runs/revisions --output_dir runs/sl_cai

The model answers each prompt, then num_revisions times critiques its latest answer under a critique request
drawn from --revision_requests and revises it under the paired revision request, each in its own conversation
(detail 25 of docs/implementation_details.md; the steps below are numbered as it lists them for sl_cai.py).
The second stage, RL from AI feedback (rlaif.py), then starts from the fine-tuned model. Reported: the gold
score, diversity and length of the responses before revision and after each round, and how many revisions
were cut and dropped.
"""

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from transformers import AutoModelForCausalLM

import common
import plumbing


@dataclass
class Args:
    # ---- algorithm ----
    revision_requests: str = "data/world/revision_requests.json"
    """a JSON list of {"critique": ..., "revision": ...} request pairs (Bai et al. 2022, appendix C); each round of
    each response draws one"""
    num_revisions: int = 2
    """rounds of critique and revision of each response"""
    response_length: int = 64
    """longest response, critique or revision in tokens (a revision cut there is dropped, counted)"""
    rollout_temperature: float = 1.0
    """sampling temperature of the responses, critiques and revisions"""
    # ---- data ----
    model_name_or_path: str = "runs/sft"
    """the chat model that answers, critiques and revises (through its chat template)"""
    dataset_name: str = "data/world/prompts"
    """prompts {prompt}; those of the train split are answered"""
    max_prompts: int | None = None
    """revise the responses to at most this many prompts (None: all)"""
    max_prompt_length: int = 128
    """longest prompt in tokens; longer ones are dropped, counted"""
    batch_size: int = 64
    """conversations sampled at once (by each process under torchrun)"""
    # ---- evaluation ----
    gold_scorer: str | None = "data.gold:score"
    """the task's true score of responses, "module:function" taking (prompts, responses) and returning one score
    each, reported before and after each round (the offline world's gold rater; None: off)"""
    # ---- run ----
    output_dir: str = "runs/revisions"
    """the SFT dataset (train.jsonl), every critique and revision (revisions.jsonl) and the figures (revision.json)"""
    seed: int = 1
    """seed of sampling and of the requests drawn"""
    bf16: bool | None = None
    """bf16 autocast (--bf16 True/False); by default on with CUDA, off on the CPU"""


def load_revision_requests(path):
    """The critique and revision request pairs of a JSON file: a list of {"critique": ..., "revision": ...}."""
    try:
        pairs = json.loads(plumbing.read_text(path, "--revision_requests"))
    except json.JSONDecodeError:
        pairs = None
    requests = isinstance(pairs, list) and pairs and all(isinstance(p, dict) for p in pairs)
    if not requests or not all(
        isinstance(p.get(k), str) and p[k].strip() for p in pairs for k in ("critique", "revision")
    ):
        plumbing.fail(
            f'--revision_requests {path!r} is not a JSON list of {{"critique": ..., "revision": ...}} objects'
        )
    return pairs


def critique_messages(prompt, response, request):
    """The model's conversation when asked to critique its response (step 2): the prompt (a text prompt becomes a
    user message), its response, and the critique request as the user's next message."""
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return [*turns, {"role": "assistant", "content": response}, {"role": "user", "content": request["critique"]}]


def revision_messages(prompt, response, request, critique):
    """The conversation when asked to revise (step 3): the critique's, its critique, and the revision request."""
    return [
        *critique_messages(prompt, response, request),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": request["revision"]},
    ]


def latest_response(record):
    """A record's latest response: its last revision, or the first response before any."""
    return record["rounds"][-1]["revision"] if record["rounds"] else record["response"]


def generate(model, tok, conversations, args, device, autocast):
    """The model's reply to each conversation (in batches of batch_size, each rank its share under torchrun): the
    text, and whether it ended with EOS (else it was cut at response_length)."""
    eos, local_conversations, replies = tok.eos_token_id, common.shard(conversations), []
    for i in range(0, len(local_conversations), args.batch_size):
        prompt_ids = [common.encode_prompt(tok, c) for c in local_conversations[i : i + args.batch_size]]
        ids, mask = (t.to(device) for t in common.pad(prompt_ids, tok.pad_token_id, "left"))
        with torch.inference_mode(), autocast, common.gathered(model):
            raw = common.sample(model, ids, mask, args.response_length, args.rollout_temperature, eos, stop_at_eos=True)
        responses, _, has_eos = common.truncate_after_eos(raw, eos, tok.pad_token_id)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        replies += [(t.strip(), bool(e)) for t, e in zip(texts, has_eos.tolist(), strict=True)]
    return common.gather(replies)[: len(conversations)]


if __name__ == "__main__":
    # ---- TRY NOT TO MODIFY: arguments, seeding, device, data, model ------------------------------------
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "num_revisions response_length rollout_temperature max_prompts max_prompt_length batch_size",
            "(-inf, inf)": "seed",
        },
    )
    plumbing.seed_everything(args.seed)
    plumbing.check_output_dir(args, "sl_cai.py")
    gold_scorer = plumbing.load_function(args.gold_scorer, "gold_scorer")
    device, autocast, _, _ = plumbing.device_and_autocast(args.bf16, compile=False, kernel_cache=32)
    rng = random.Random(args.seed)  # the request pair of each round of each response
    common.seed_sampling(args.seed)
    requests = load_revision_requests(args.revision_requests)
    train_rows, _, _ = common.load_splits(args.dataset_name, [["prompt"]], seed=args.seed)
    tok = common.load_tokenizer(args.model_name_or_path)
    if tok.chat_template is None:
        plumbing.fail(
            f"sl_cai.py needs a chat model: the tokenizer of {args.model_name_or_path!r} has no chat template"
        )
    model = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device)
    plumbing.shard_model(model.eval().requires_grad_(False))  # under torchrun: FSDP2
    rows = train_rows[: args.max_prompts or len(train_rows)]
    _, kept = common.encode_prompts(tok, rows, args.max_prompt_length)  # prompts over the limit dropped, counted
    prompts = [rows[i]["prompt"] for i in kept]

    # ---- ALGO LOGIC: critique and revise (Bai et al. 2022, section 3.1 and appendix C) -------------------
    # 1. the model's own response to each prompt (one cut at response_length is critiqued and revised as it is)
    replies = generate(model, tok, prompts, args, device, autocast)
    records = [
        {"prompt": p, "response": r, "response_cut": not has_eos, "rounds": []}
        for p, (r, has_eos) in zip(prompts, replies, strict=True)
    ]
    alive, dropped = list(range(len(records))), {}
    for n in range(1, args.num_revisions + 1):
        # 2. a critique of the latest response under a request pair drawn for this round
        drawn = {i: rng.choice(requests) for i in alive}
        conversations = [critique_messages(records[i]["prompt"], latest_response(records[i]), drawn[i]) for i in alive]
        critiques = generate(model, tok, conversations, args, device, autocast)
        # 3. the revision, asked after the critique; it replaces the response for the next round
        conversations = [
            revision_messages(records[i]["prompt"], latest_response(records[i]), drawn[i], c)
            for i, (c, _) in zip(alive, critiques, strict=True)
        ]
        revisions = generate(model, tok, conversations, args, device, autocast)
        for i, (critique, _), (revision, has_eos) in zip(alive, critiques, revisions, strict=True):
            records[i]["rounds"].append(
                {
                    "critique_request": drawn[i]["critique"],
                    "critique": critique,
                    "revision_request": drawn[i]["revision"],
                    "revision": revision,
                    "revision_cut": not has_eos,
                }
            )
        # a revision cut at response_length has lost its end: it leaves the dataset and the later rounds
        before = len(alive)
        alive = [i for i, (_, has_eos) in zip(alive, revisions, strict=True) if has_eos]
        dropped[f"dropped_revision_{n}"] = before - len(alive)
    kept_records = [records[i] for i in alive]
    if not kept_records:
        plumbing.fail(
            f"every revision was cut at response_length {args.response_length} tokens: nothing to fine-tune on "
            f"({', '.join(f'{k} {v}' for k, v in dropped.items())})"
        )

    # ---- 4. gold score and diversity of the same prompts' responses before revision and after each round -------
    texts = [common.plain_text(r["prompt"]) for r in kept_records]
    stages = [[r["response"] for r in kept_records]]
    stages += [[r["rounds"][n]["revision"] for r in kept_records] for n in range(args.num_revisions)]
    responses_cut = sum(r["response_cut"] for r in records)
    results = {"prompts": len(records), "kept": len(kept_records), "responses_cut": responses_cut, **dropped}
    for n, responses in enumerate(stages):
        name = f"revision_{n}" if n else "response"
        results[f"{name}_distinct_2"] = common.distinct_n(responses)
        results[f"{name}_mean_words"] = float(np.mean([len(r.split()) for r in responses]))
        if gold_scorer is not None:
            results[f"{name}_gold_score"] = float(np.mean(gold_scorer(texts, responses)))
    print(json.dumps(results, indent=2))

    # ---- 5. saving: the SFT dataset, each kept prompt with its final revision (a chat reply to a chat prompt) ---
    dataset = [
        {"prompt": r["prompt"], "completion": [{"role": "assistant", "content": latest_response(r)}]}
        if isinstance(r["prompt"], list)
        else {"prompt": r["prompt"], "completion": latest_response(r)}
        for r in kept_records
    ]

    def write(tmp):
        plumbing.write_jsonl(os.path.join(tmp, "train.jsonl"), dataset)
        plumbing.write_jsonl(os.path.join(tmp, "revisions.jsonl"), records)  # every critique and revision
        plumbing.write_json(os.path.join(tmp, "revision.json"), results)

    plumbing.write_atomic(args.output_dir, "sl_cai.py", args, write)
    print(f"saved {args.output_dir}: {len(dataset)} prompts with their revised responses for sft.py")
