"""The little that every script shares: loading, tokenisation, padding, log-probs, sampling, evaluation.

Each training script (sft.py, reward.py, dpo.py, ppo.py, rlaif.py) reads top to bottom on its own; what
lives here is only what would otherwise be copied into all of them. Detail numbers refer to GUIDE.md
section 3 ("The N Implementation Details of RLHF with PPO", Huang et al.).
"""
import json
import math
import os
import random
import shutil
import sys
from array import array
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def fail(message: str):
    """A user's mistake ends the run with one line naming it, not a traceback."""
    sys.exit(f"error: {message}")


def describe(e: Exception) -> str:
    """An exception in one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


POSITIVE_ARGS = ("batch_size", "micro_batch_size", "judge_batch_size", "num_epochs", "num_ppo_epochs", "num_mini_batches",
                 "total_episodes", "total_prompts", "max_steps", "max_length", "max_prompt_length", "judge_max_length",
                 "response_length", "max_new_tokens", "temperature", "sample_temperature", "beta", "eval_every",
                 "log_samples_every", "num_eval_samples", "num_eval_prompts", "num_normalisation_rows")


def check_args(args):
    """One line naming the first of a script's sizes, lengths, temperatures or beta that is not above 0, before
    anything is loaded (a temperature of 0 is not greedy decoding here: softmax(logits / 0) is undefined)."""
    for name in POSITIVE_ARGS:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            fail(f"--{name} must be greater than 0, got {value}")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_local(name: str) -> bool:
    """A name that exists, or is written like a path, is local; anything else is a hub id."""
    first = name.split("/")[0]
    return (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
            or name.endswith(DATA_EXTENSIONS) or (first != name and os.path.isdir(first)))


# ---- loading ----------------------------------------------------------------------------------------
def read_json_rows(path: str) -> list[dict]:
    """The rows of a .jsonl file (one object per line) or a .json file (a list of objects, or lines)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    rows = None
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            pass  # JSON Lines under a .json name, as `datasets` also reads them
    if rows is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    fail(f"dataset {path!r}, line {n}: not JSON ({e.msg})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        fail(f"dataset {path!r} must hold one JSON object per row")
    return rows


def json_splits(name: str):
    """{split: rows} of a .json/.jsonl file (all "train") or of a directory of train/test/validation .json(l)
    files, read with the json module; None for anything else, which `datasets` loads. Importing `datasets`
    (with pyarrow and pandas) adds ~90 MB of resident memory to a process that only needs the rows."""
    if os.path.isfile(name):
        return {"train": read_json_rows(name)} if name.endswith((".json", ".jsonl")) else None
    if not os.path.isdir(name):
        return None
    files = [f for f in os.listdir(name) if not f.startswith(".") and f != "README.md"]
    splits = {os.path.splitext(f)[0]: f for f in files if f.endswith((".json", ".jsonl"))}
    if not files or len(splits) < len(files) or not set(splits) <= {"train", "test", "validation"}:
        return None
    return {split: read_json_rows(os.path.join(name, f)) for split, f in splits.items()}


def load_splits(name: str, columns: list[list[str]], eval_fraction: float = 0.05, seed: int = 0):
    """Train and eval rows (lists of dicts) of a hub dataset, a local directory, or a local .json/.jsonl file.

    `columns` lists the accepted column sets (e.g. [["prompt","completion"], ["messages"], ["text"]]);
    the first one the data has is returned with the splits. The eval split is "test" or "validation"
    when there is one, otherwise a seeded `eval_fraction` of train held out (the rows `datasets`'
    train_test_split would hold out).
    """
    if is_local(name) and not os.path.exists(name):
        fail(f"dataset {name!r} does not exist")
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        fail(f"dataset {name!r} is empty")
    splits = json_splits(name)
    if splits is None:
        from datasets import load_dataset

        try:
            if os.path.isfile(name):
                ext = os.path.splitext(name)[1].lstrip(".")
                ds = load_dataset({"txt": "text"}.get(ext, ext), data_files=name)
            else:
                ds = load_dataset(name)
        except Exception as e:  # the datasets library raises many types; the first line says what went wrong
            where = "" if is_local(name) else " (a hub id: is the machine offline? HF_HUB_OFFLINE=1 fails fast)"
            fail(f"could not load dataset {name!r}{where}: {describe(e)}")
        splits = {split: ds[split].to_list() for split in ds}
    if "train" not in splits:
        fail(f"dataset {name!r} has no 'train' split (it has {list(splits)})")
    train = splits["train"]
    if not train:
        fail(f"dataset {name!r} is empty")
    names = list(dict.fromkeys(k for row in train for k in row))
    found = next((c for c in columns if set(c) <= set(names)), None)
    if found is None:
        fail(f"dataset {name!r} has columns {names}; expected one of "
             + " or ".join("{" + ", ".join(c) + "}" for c in columns))
    eval_name = next((s for s in ("test", "validation") if splits.get(s)), None)
    for split in filter(None, ("train", eval_name)):  # a row without a column of the set
        missing = next(((i, c) for i, row in enumerate(splits[split]) for c in found if row.get(c) is None), None)
        if missing:
            fail(f"dataset {name!r}: row {missing[0]} of {split} has no {missing[1]!r}")
    if eval_name:
        evals = splits[eval_name]
    else:
        if len(train) < 2:
            fail(f"dataset {name!r} has {len(train)} row and no test split: nothing to hold out")
        order = np.random.default_rng(seed).permutation(len(train))
        n_eval = math.ceil(eval_fraction * len(train))
        train, evals = [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]
    return train, evals, found


def load_tokenizer(name: str):
    """The tokenizer, with a dedicated pad token (detail 1: never EOS as pad) added if it lacks one."""
    from transformers import AutoTokenizer

    if is_local(name) and not os.path.isdir(name):
        fail(f"model {name!r} " + ("is not a directory" if os.path.exists(name) else "does not exist"))
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        fail(f"could not load a tokenizer from {name!r}: {describe(e)}")
    if tok.eos_token_id is None:
        fail(f"the tokenizer of {name!r} has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
        print(f"note: the tokenizer of {name!r} had no pad token distinct from EOS; added <|pad|> (id {tok.pad_token_id})")
    return tok


def load_model(cls, name: str, tok, device, dtype=torch.float32, new_head: bool = False, **kwargs):
    """A transformers model whose embeddings fit the tokenizer (a pad token may have been added). Weights
    come from safetensors only, and no code from the hub runs (trust_remote_code stays off). The checkpoint
    must have the head `cls` asks for (a causal LM, a sequence classifier), unless `new_head` allows one."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(name).architectures or []
        kind = "ForCausalLM" if "CausalLM" in cls.__name__ else "ForSequenceClassification"
        if architectures and not new_head and not any(a.endswith(kind) for a in architectures):
            fail(f"{name!r} holds a {architectures[0]}, not a model ending in {kind}")
        if device.type == "cpu" and torch.backends.mkldnn.matmul.fp32_precision == "bf16":
            # with oneDNN matmuls, plain attention (two batched matmuls) beats SDPA's CPU kernel, whose small
            # inner GEMMs then pay oneDNN's per-call cost: training steps 1.6x faster on the world's model
            kwargs.setdefault("attn_implementation", "eager")
        model = cls.from_pretrained(name, dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        fail(f"could not load {cls.__name__} from {name!r}: {describe(e)}")
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device)


def device_and_autocast(bf16: bool = True, compile: bool = True, kernel_cache: int = 16):
    """(device, autocast context, compile?): bf16 autocast and torch.compile on CUDA; fp32 without compile
    on CPU, where bf16 is emulated (~30x slower than fp32 here) and compile gained only ~7%. `kernel_cache`:
    see use_onednn_fp32_matmul."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
        return torch.device("cuda"), ctx, compile
    onednn = use_onednn_fp32_matmul(kernel_cache)
    print("note: no CUDA device: training in fp32 without torch.compile on the CPU"
          + (" (matmuls by oneDNN)" if onednn else ""))
    return torch.device("cpu"), nullcontext(), False


def use_onednn_fp32_matmul(kernel_cache: int) -> bool:
    """Send fp32 matmuls to oneDNN instead of MKL, when oneDNN still computes them in fp32 on this CPU.

    MKL's fp32 GEMM runs at about half speed on AMD CPUs (185 vs 380 GFLOP/s on this project's 2-core EPYC).
    torch routes fp32 matmuls to oneDNN only when they may use bf16 inside (fp32_precision "bf16"); a CPU
    without bf16 matrix units (AMX) then still computes in fp32. Checked on a product that bf16 would round
    (1 + 2^-10 is 1 in bf16): where it is not exact to fp32, the setting is undone and MKL keeps the work.
    oneDNN and its torch wrapper cache their kernels per matmul shape: both caches are kept small (the
    variables are read at the first matmul) and pad() makes widths multiples of 8, so few shapes recur.
    `kernel_cache` entries suit one training step's shapes (16: 12-26 MB lower peaks than 32 for SFT, reward
    and DPO at the same speed); PPO and RLAIF, which also sample, keep 32 (16 cost PPO with 4 epochs ~8%)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(kernel_cache))
    os.environ.setdefault("LRU_CACHE_CAPACITY", "4")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    x = torch.full((64, 64), 1 + 2 ** -10)
    if abs((x @ x)[0, 0].item() - 64 * (1 + 2 ** -10) ** 2) > 1e-4:  # bf16 gives 64.0, fp32 64.125
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    return torch.backends.mkldnn.matmul.fp32_precision == "bf16"


# ---- tokenisation -----------------------------------------------------------------------------------
def encode_prompt(tok, prompt) -> list[int]:
    """Token ids of a prompt: plain text, or a list of chat messages rendered with the generation prompt."""
    if isinstance(prompt, list):
        if tok.chat_template is None:
            fail("the data is conversational (lists of messages) but the tokenizer has no chat template")
        return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tok(prompt)["input_ids"]


def encode_prompts(tok, rows, max_length: int, split: str = "train"):
    """(token ids, row indices) of the prompts that fit in max_length tokens; the others are dropped and
    the count is said."""
    ids = [encode_prompt(tok, r["prompt"]) for r in rows]
    kept = [i for i, x in enumerate(ids) if len(x) <= max_length]
    if len(kept) < len(ids):
        print(f"note: {split}: {len(ids) - len(kept)} of {len(ids)} prompts longer than {max_length} tokens dropped")
    if not kept:
        fail(f"no {split} prompt fits in {max_length} tokens")
    return [ids[i] for i in kept], kept


def encode_completion(tok, prompt, completion) -> list[int]:
    """Token ids of a completion, ending with exactly one EOS (detail 2). Tokenised apart from the prompt,
    exactly as the policy will later generate it after the prompt's ids. A conversational completion is
    the part of the rendered conversation that follows the rendered prompt."""
    if isinstance(completion, list):
        if not isinstance(prompt, list) or not prompt:
            fail("a conversational completion (a list of messages) needs a conversational prompt: a non-empty "
                 f"list of messages before it, got {prompt!r:.60}")
        head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(head):
            fail("the chat template renders the prompt differently with and without the completion")
        completion = full[len(head):]
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]


def encode_demonstration(tok, row, fmt: list[str]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a demonstration in the column set `fmt` that load_splits found:
    {prompt, completion}, {messages} (the last message is the completion) or {text} (no prompt: [] or [BOS])."""
    if fmt == ["messages"]:
        prompt, completion = row["messages"][:-1], row["messages"][-1:]
    elif fmt == ["text"]:
        prompt, completion = "", row["text"]
    else:
        prompt, completion = row["prompt"], row["completion"]
    p = encode_prompt(tok, prompt) if prompt else tok("")["input_ids"]
    return p, encode_completion(tok, prompt, completion)


def tokenize_pairs(tok, rows, max_length: int, extra_columns=()):
    """(prompt_ids, chosen_ids, rejected_ids, extras, row index) per preference pair; each response ends
    with EOS. Pairs with prompt + response over max_length are dropped, and the count is said. The ids are
    kept as array("i"): 4 bytes a token where a list of Python ints takes ~40 (the world's 4096 pairs: 3 MB
    instead of 18); `+` still concatenates."""
    out = []
    for i, row in enumerate(rows):
        for k in extra_columns:
            if not isinstance(row[k], (int, float)) or isinstance(row[k], bool) or not math.isfinite(row[k]):
                fail(f"column {k!r} must hold a finite number in every row, not {row[k]!r:.40}")
        p = encode_prompt(tok, row["prompt"])
        c, r = (encode_completion(tok, row["prompt"], row[k]) for k in ("chosen", "rejected"))
        if len(p) + max(len(c), len(r)) <= max_length:
            out.append((array("i", p), array("i", c), array("i", r), [float(row[k]) for k in extra_columns], i))
    if len(out) < len(rows):
        print(f"note: {len(rows) - len(out)} of {len(rows)} pairs longer than max_length {max_length} dropped")
    if not out:
        fail(f"no pair fits in max_length {max_length}")
    return out


def pad(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """(ids, mask) as tensors. Left padding for generation, right padding for training (detail 3)."""
    width = -(-max(len(s) for s in seqs) // 8) * 8  # a multiple of 8: few distinct shapes (cached kernels)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def pad_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Right-padded prompt + completion ids, attention mask, and the mask of completion tokens."""
    ids, mask = pad([p + c for p, c in zip(prompts, completions)], pad_id)
    completion_mask, _ = pad([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0)
    return ids, mask, completion_mask


def length_grouped_batches(lengths, batch_size: int, rng: np.random.Generator, group: int = 64):
    """Shuffled batches of similar length (sorted inside windows of `group` batches): less padding."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * group):
        window = sorted(order[start:start + batch_size * group], key=lambda i: -lengths[i])
        batches += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ---- log-probs and masked statistics ----------------------------------------------------------------
def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at the first real token (detail 3)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


LOGITS_PER_BLOCK = 2 ** 20
"""logprobs_from_logits works through the batch in blocks of rows holding about this many logits"""


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], as the gathered logit minus logsumexp: no log_softmax copy."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits), as logsumexp - E[logit]: no log_softmax copy."""
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def in_row_blocks(fn, logits: torch.Tensor, *tensors: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fn(fp32 logits / T, *tensors) over (B, T, V) logits one block of rows at a time, concatenated.

    The fp32 copy of the logits (bf16 on a GPU) and the temporaries of logsumexp and softmax then exist for
    one block only. With gradients, a block's forward is re-run in the backward (torch.utils.checkpoint), so
    only the logits themselves are kept for it. With a 50k-150k vocabulary the full copy would be the
    largest tensor of a step (2 GB in fp32 for 16 x 640 tokens and 50k; one row's block: 128 MB). Even with
    the peer benchmark's 2048-token vocabulary it takes ~35 MB off DPO's CPU peak at the same speed (README)."""
    def on_block(x, *ts):
        return fn(x.float() if temperature == 1 else x.float() / temperature, *ts)

    rows = max(1, LOGITS_PER_BLOCK // (logits.shape[1] * logits.shape[2]))
    recompute = torch.is_grad_enabled() and logits.requires_grad
    blocks = zip(logits.split(rows), *(t.split(rows) for t in tensors))
    return torch.cat([checkpoint(on_block, *block, use_reentrant=False, preserve_rng_state=False)
                      if recompute else on_block(*block)  # (no randomness to replay)
                      for block in blocks])


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (details 4 and 5) of (B, T, V) logits, in blocks of rows."""
    return in_row_blocks(token_logprobs, logits, tokens, temperature=temperature)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy of the temperature-scaled policy, (B, T), in blocks of rows."""
    return in_row_blocks(token_entropy, logits, temperature=temperature)


def sequence_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A one-label sequence classifier's score of each (left- or right-padded) sequence: transformers reads the
    head at the last real token (detail 6)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits[:, 0].float()


def forward_logprobs(model, ids, mask, temperature: float = 1.0, keep: int = 0):
    """Per-token log-probs of ids[:, 1:] under the model: (B, T-1), or of the last `keep` tokens."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                   logits_to_keep=keep + 1 if keep else 0).logits[:, :-1]
    return logprobs_from_logits(logits, ids[:, -logits.shape[1]:], temperature)


def completion_logps(model, prompts, completions, pad_id: int, device):
    """Summed log-probs of each completion given its prompt, and its number of tokens: (B,), (B,).
    Logits are only made from the end of the shortest prompt on: the LM head skips prompt-only positions."""
    ids, mask, completion_mask = (t.to(device) for t in pad_completions(prompts, completions, pad_id))
    keep = min(ids.shape[1] - min(len(p) for p in prompts), ids.shape[1] - 1)
    logp = forward_logprobs(model, ids, mask, keep=keep)  # log-probs of ids[:, -keep:]
    return (logp * completion_mask[:, -keep:]).sum(1), completion_mask[:, -keep:].sum(1)


def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim) if dim is not None else (x * mask).sum() / mask.sum()


def masked_var(x, mask, unbiased=True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the real tokens only (detail 13); shift_mean=False keeps the mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    return white if shift_mean else white + mean


def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row, or the row length when there is none."""
    length = bools.shape[-1]
    idx = torch.arange(length, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, length).min(-1).values


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """Everything after the first EOS becomes pad (detail 10). Returns (responses, mask, has_eos)."""
    first = first_true_index(responses == eos_id)
    idx = torch.arange(responses.shape[1], device=responses.device)
    mask = (idx[None] <= first[:, None]).long()
    return torch.where(mask.bool(), responses, pad_id), mask, first < responses.shape[1]


# ---- sampling and evaluation ------------------------------------------------------------------------
@torch.inference_mode()
def sample(model, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float, eos_id: int,
           stop_at_eos: bool = False):
    """Sample with a KV cache from left-padded prompts: pure sampling at a temperature (top_k 0, top_p 1).
    Returns the (B, max_new_tokens) tokens drawn; truncate_after_eos() applies the EOS trick to them.
    With stop_at_eos it stops early once every row has an EOS (checked every 8 tokens).

    The cache is static (its length fixed at prompt + max_new_tokens), so every decoding step has the same
    shapes: no concatenation per token, and on the CPU oneDNN reuses its matmul kernels instead of setting up
    new ones as the cache grows. Future positions are masked by causality, so the attention mask can cover
    the whole length from the start."""
    from transformers import StaticCache

    B, Q = prompt_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=Q + max_new_tokens)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], 1)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    step_ids, step_pos, tokens = prompt_ids, position_ids(prompt_mask), []
    for t in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                       past_key_values=cache, logits_to_keep=1).logits[:, -1]
        probs = torch.softmax(logits.float() / temperature, -1)
        # Inverse-CDF draw: one uniform number per row. torch.multinomial draws one random number per
        # vocabulary entry, a tenth of each decoding step on the CPU. The cumulative sum is in float64, so even
        # tiny probabilities of a large vocabulary keep their share; a zero-probability token is never drawn.
        cdf = probs.double().cumsum(-1)
        u = torch.rand(B, 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
        step_ids = torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)
        tokens.append(step_ids)
        if stop_at_eos:
            done |= step_ids[:, 0] == eos_id
            if t % 8 == 7 and done.all():
                break
        step_pos = step_pos[:, -1:] + 1
    responses = torch.cat(tokens, 1)
    return torch.nn.functional.pad(responses, (0, max_new_tokens - responses.shape[1]), value=eos_id)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of a set of samples: low means the samples repeat."""
    grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.inference_mode()
def evaluate(policy, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float, batch_size: int,
             autocast=nullcontext(), ref=None, gold: bool = True, reward_model=None):
    """Sample once per held-out prompt from the policy (and from the reference, on the same prompts) and
    score the samples. Returns (metrics, samples) with the keys every script's eval.json shares:
    eos_rate, mean_length, distinct_2, gold_score (the world's gold rater) and, given a reference,
    gold_win_rate_vs_ref (pairwise on the same prompt, ties count half) and kl_to_ref (mean over samples of
    sum_t log pi(y_t) - log pi_ref(y_t) on the policy's own samples: an unbiased estimate of KL(pi || pi_ref)),
    and given a reward model, rm_score (its mean score of the policy's samples)."""
    if not all(bool(torch.isfinite(p).all()) for p in policy.parameters()):  # e.g. an update that blew up
        fail("the policy's weights are not finite (an update exploded): stopped before saving the model; lower the learning rate")
    device, eos, pad_id = next(policy.parameters()).device, tok.eos_token_id, tok.pad_token_id
    texts, ref_texts, lengths, has_eos, kls, rm_scores = [], [], [], [], [], []
    for i in range(0, len(prompts), batch_size):
        ids, mask = (t.to(device) for t in pad(prompts[i:i + batch_size], pad_id, "left"))
        with autocast:
            responses, resp_mask, eos_found = truncate_after_eos(
                sample(policy, ids, mask, max_new_tokens, temperature, eos, stop_at_eos=True), eos, pad_id)
        texts += tok.batch_decode(responses, skip_special_tokens=True)
        lengths += resp_mask.sum(1).tolist()
        has_eos += eos_found.tolist()
        seq, seq_mask, n = torch.cat([ids, responses], 1), torch.cat([mask, resp_mask], 1), responses.shape[1]
        if reward_model is not None:
            with autocast:
                rm_scores += sequence_scores(reward_model, seq, seq_mask).tolist()
        if ref is None:
            continue
        with autocast:
            kl = forward_logprobs(policy, seq, seq_mask, temperature, n) - forward_logprobs(ref, seq, seq_mask, temperature, n)
            kls += (kl * resp_mask).sum(1).tolist()
            ref_responses = truncate_after_eos(
                sample(ref, ids, mask, max_new_tokens, temperature, eos, stop_at_eos=True), eos, pad_id)[0]
        ref_texts += tok.batch_decode(ref_responses, skip_special_tokens=True)
    metrics = {"eos_rate": float(np.mean(has_eos)), "mean_length": float(np.mean(lengths)),
               "distinct_2": distinct_n(texts, 2)}
    samples = [{"prompt": p, "response": r} for p, r in zip(tok.batch_decode(prompts, skip_special_tokens=True), texts)]
    if ref is not None:
        metrics["kl_to_ref"] = float(np.mean(kls))
    if reward_model is not None:
        metrics["rm_score"] = float(np.mean(rm_scores))
    if gold:
        from data.gold import gold_score

        scores = np.array([gold_score(t) for t in texts])
        metrics["gold_score"] = float(scores.mean())
        for s, g in zip(samples, scores):
            s["gold"] = round(float(g), 3)
        if ref is not None:
            ref_scores = np.array([gold_score(t) for t in ref_texts])
            metrics["gold_score_ref"] = float(ref_scores.mean())
            metrics["gold_win_rate_vs_ref"] = float(np.mean((scores > ref_scores) + 0.5 * (scores == ref_scores)))
    return metrics, samples


# ---- outputs, checkpoints and logs ------------------------------------------------------------------
CHECKPOINT = "checkpoint"


def replace_dir(tmp: str, target: str):
    """Put directory tmp in target's place by renames: a crash leaves the old one or the new one, never half."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_run_info(directory: str, script: str, args):
    with open(os.path.join(directory, "run.json"), "w") as f:
        json.dump({"script": script, "args": vars(args)}, f, indent=2, default=str)


RESUME_MAY_CHANGE = ("resume", "output_dir", "save_every", "skip_nonfinite", "track", "wandb_project")
"""arguments a resumed run may set differently; any other change would make it another run"""


def check_output_dir(args, script: str):
    """Refuse, before any training, to overwrite a directory holding anything but a run of this script;
    with --resume, require its checkpoint, written with the same arguments."""
    output_dir = args.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        fail(f"--output_dir {output_dir!r} is a file")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        infos = [os.path.join(output_dir, "run.json"), os.path.join(output_dir, CHECKPOINT, "run.json")]
        previous = next((json.load(open(i)).get("script") for i in infos if os.path.isfile(i)), None)
        if previous != script:
            what = f"the output of {previous}" if previous else "files that no run of this project wrote"
            fail(f"--output_dir {output_dir!r} already holds {what}; choose another directory or remove it")
    if args.resume:
        if not os.path.isfile(os.path.join(output_dir, CHECKPOINT, "state.pt")):
            fail(f"--resume: no checkpoint in {output_dir!r} (write them with --save_every)")
        saved = json.load(open(os.path.join(output_dir, CHECKPOINT, "run.json")))["args"]
        now = json.loads(json.dumps(vars(args), default=str))  # as run.json holds them
        changed = [f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
        if changed:
            fail(f"--resume with other arguments than the checkpoint's run: {', '.join(changed)}")


def save_atomic(output_dir: str, script: str, args, write):
    """write(tmp_dir) fills a temporary directory, which then replaces output_dir (and its checkpoint)."""
    output_dir = output_dir.rstrip("/")
    tmp = f"{output_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    write_run_info(tmp, script, args)
    replace_dir(tmp, output_dir)


def save_checkpoint(output_dir: str, script: str, args, models: dict, optimizer, scheduler, state: dict):
    """All a run needs to continue exactly as if never stopped: weights (safetensors), optimizer, scheduler,
    the RNGs and the script's own `state` (data position, ...), written atomically to output_dir/checkpoint."""
    from safetensors.torch import save_model

    target = os.path.join(output_dir, CHECKPOINT)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, model in models.items():
        save_model(model, os.path.join(tmp, f"{name}.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, **state},
               os.path.join(tmp, "state.pt"))
    write_run_info(tmp, script, args)
    replace_dir(tmp, target)


def load_checkpoint(output_dir: str, models: dict, optimizer, scheduler) -> dict:
    """Restore what save_checkpoint wrote; returns the script's own state. Tensors only (weights_only=True)."""
    from safetensors.torch import load_model

    path = os.path.join(output_dir, CHECKPOINT)
    for name, model in models.items():
        load_model(model, os.path.join(path, f"{name}.safetensors"))
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler_state = state.pop("scheduler")
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    torch.set_rng_state(state.pop("torch_rng"))
    random.setstate(state.pop("python_rng"))
    cuda_rng = state.pop("cuda_rng", None)  # sampling on the GPU draws from its generators
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    print(f"resumed from {path} at step {state.get('step')}")
    return state


def finite_or_stop(value: torch.Tensor, what: str, step: int, skip: bool) -> bool:
    """True when `value` is finite. Otherwise the run stops with a message naming the step, before anything
    more is saved (the last checkpoint and output stay intact), or, with skip, the caller skips the batch."""
    if bool(torch.isfinite(value).all()):
        return True
    if skip:
        print(f"note: non-finite {what} at step {step}: batch skipped (--skip_nonfinite)")
        return False
    print(file=sys.stderr)  # end the progress bar's line, so the error is a line of its own
    fail(f"non-finite {what} at step {step}; stopped before saving anything more "
         "(the last checkpoint and output are intact; --skip_nonfinite skips such batches)")


def start_tracking(args, script: str):
    """(run name, log, history): log(metrics, step) appends the numbers to history (saved as metrics.jsonl)
    and sends everything to wandb when --track asks for it (wandb is never contacted otherwise)."""
    import time

    run_name = f"{script}__{args.seed}__{int(time.time())}"
    history, wandb = [], None
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project, name=run_name, config=vars(args))

    def log(metrics: dict, step: int):
        history.append({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        if wandb is not None:
            wandb.log(metrics, step=step)

    return run_name, log, history


def write_jsonl(path: str, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
