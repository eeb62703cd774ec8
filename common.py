"""What the algorithms visibly use: reading a dataset, what its rows may hold and how their text becomes tokens,
padding, log-probs, sampling, the learning-rate schedule, the collectives of several processes, LoRA's adapters, and
evaluation.

The algorithms themselves live in their scripts; run plumbing (errors, models, checkpoints, logs) in plumbing.py.
"Detail N" refers to docs/implementation_details.md.
"""

import json
import math
import os
from array import array
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

import plumbing

# ---- datasets: the files a script reads, and what their rows may hold -----------------------------------
# load_splits checks every row with check_rows before anything is tokenised
TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "text")  # a string, or a list of chat messages
ROLES = ("system", "user", "assistant")  # the roles of a chat message in a dataset


def text_problem(text) -> str | None:
    """What makes a dataset's text field neither a string nor a list of {"role", "content"} chat messages, or None."""
    if isinstance(text, str):
        return None
    if not isinstance(text, list) or not text:
        return f"not a string or a list of chat messages, but {text!r:.60}"
    for m in text:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"a chat message without a string 'content': {m!r:.60}"
        if m.get("role") not in ROLES:
            return f"a chat message of role {m.get('role')!r}, not one of {', '.join(ROLES)}"
    return None


def check_rows(name: str, split: str, rows: list[dict], columns: list[str]):
    """Every row has each column; a text column holds text, "messages" chat messages, "responses" a list of texts."""
    for i, row in enumerate(rows):
        for c in columns:
            if row.get(c) is None:
                plumbing.fail(f"dataset {name!r}: row {i} of {split} has no {c!r}")
            listed = isinstance(row[c], list)
            if c == "responses":
                problem = next(filter(None, map(text_problem, row[c])), None) if listed else "not a list of responses"
            elif c in (*TEXT_COLUMNS, "messages"):
                problem = text_problem(row[c]) if listed or c != "messages" else "not a list of chat messages"
            else:
                problem = None  # a numeric column is checked where it is read
            if problem:
                plumbing.fail(f"dataset {name!r}: row {i} of {split}, column {c!r}: {problem}")


def read_json_rows(path: str) -> list[dict]:
    """The rows of a .jsonl file, or of a .json file holding a list of objects (or lines, as `datasets` reads it)."""
    text, rows = plumbing.read_text(path, "dataset"), None
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            pass
    if rows is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                plumbing.fail(f"dataset {path!r}, line {n}: not JSON ({e.msg})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        plumbing.fail(f"dataset {path!r} must hold one JSON object per row")
    return rows


def read_splits(name: str) -> dict:
    """{split: rows} of a .json(l) file (all "train"), of a directory of train/test/validation .json(l) files (the
    json module: importing `datasets` pulls in pyarrow and pandas), or else through `datasets`."""
    files = [f for f in os.listdir(name) if not f.startswith(".") and f != "README.md"] if os.path.isdir(name) else []
    splits = {os.path.splitext(f)[0]: os.path.join(name, f) for f in files}
    if os.path.isfile(name) and name.endswith((".json", ".jsonl")):
        return {"train": read_json_rows(name)}
    if files and all(f.endswith((".json", ".jsonl")) for f in files) and set(splits) <= {"train", "test", "validation"}:
        return {split: read_json_rows(path) for split, path in splits.items()}
    from datasets import load_dataset

    ext = os.path.splitext(name)[1].lstrip(".")  # a local csv, parquet or txt file: its builder and the file
    builder, data_files = ({"txt": "text"}.get(ext, ext), name) if os.path.isfile(name) else (name, None)
    try:
        return {split: rows.to_list() for split, rows in load_dataset(builder, data_files=data_files).items()}
    except Exception as e:  # the datasets library raises many types; the first line says what went wrong
        where = "" if plumbing.is_local(name) else " (a hub id: is the machine offline? HF_HUB_OFFLINE=1 fails fast)"
        plumbing.fail(f"could not load dataset {name!r}{where}: {plumbing.describe(e)}")


def load_splits(name: str, columns: list[list[str]], eval_fraction: float = 0.05, seed: int = 0):
    """(train rows, eval rows, column set): the first accepted set of `columns` the dataset has, every row checked.
    The eval rows are its "test" or "validation" split, else a seeded `eval_fraction` of train."""
    if plumbing.is_local(name) and not os.path.exists(name):
        plumbing.fail(f"dataset {plumbing.does_not_exist(name)}")
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        plumbing.fail(f"dataset {name!r} is empty")
    splits = read_splits(name)
    train = splits.get("train")
    if not train:
        plumbing.fail(
            f"dataset {name!r} is empty" if train == [] else f"dataset {name!r} has no 'train' split ({list(splits)})"
        )
    names = list(dict.fromkeys(k for row in train for k in row))
    found = next((c for c in columns if set(c) <= set(names)), None)
    if found is None:
        expected = " or ".join("{" + ", ".join(c) + "}" for c in columns)
        plumbing.fail(f"dataset {name!r} has columns {names}; expected one of {expected}")
    eval_name = next((s for s in ("test", "validation") if splits.get(s)), None)
    for split in filter(None, ("train", eval_name)):
        check_rows(name, split, splits[split], found)
    if eval_name:
        return train, splits[eval_name], found
    if len(train) < 2:
        plumbing.fail(f"dataset {name!r} has {len(train)} row and no test split: nothing to hold out")
    order = np.random.default_rng(seed).permutation(len(train))
    n_eval = math.ceil(eval_fraction * len(train))
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]], found


# ---- tokenisation: a row's text becomes token ids -------------------------------------------------------
def load_tokenizer(name: str):
    """The tokenizer, with a dedicated pad token added if it has none or pads with EOS (detail 1)."""
    from transformers import AutoTokenizer

    if plumbing.is_local(name) and not os.path.isdir(name):
        plumbing.fail(
            f"model {name!r} is not a directory" if os.path.exists(name) else f"model {plumbing.does_not_exist(name)}"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        plumbing.fail(f"could not load a tokenizer from {name!r}: {plumbing.describe(e)}")
    if tok.eos_token_id is None:
        plumbing.fail(f"the tokenizer of {name!r} has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
        print(f"note: the tokenizer of {name!r} had no pad token distinct from EOS; added {tok.pad_token}")
    return tok


def encode_prompt(tok, prompt) -> list[int]:
    """Token ids of a prompt: plain text, or a list of chat messages rendered with the generation prompt."""
    if isinstance(prompt, list):
        if tok.chat_template is None:
            plumbing.fail("the data is conversational (lists of messages) but the tokenizer has no chat template")
        return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tok(prompt)["input_ids"]


def encode_prompts(tok, rows, max_length: int, split: str = "train"):
    """(token ids, row indices) of the prompts that fit in max_length tokens; the others are dropped, counted."""
    ids = [encode_prompt(tok, r["prompt"]) for r in rows]
    kept = [i for i, x in enumerate(ids) if len(x) <= max_length]
    if len(kept) < len(ids):
        print(f"note: {split}: {len(ids) - len(kept)} of {len(ids)} prompts longer than {max_length} tokens dropped")
    if not kept:
        plumbing.fail(f"no {split} prompt fits in {max_length} tokens")
    return [ids[i] for i in kept], kept


def encode_completion(tok, prompt, completion) -> list[int]:
    """Token ids of a completion, ending with exactly one EOS (detail 5), tokenised apart from the prompt as the
    policy will generate it. A conversational completion is what follows the rendered prompt."""
    if isinstance(completion, list):
        if not isinstance(prompt, list) or not prompt:
            plumbing.fail(
                "a conversational completion (a list of messages) needs a conversational prompt: a non-empty "
                f"list of messages before it, got {prompt!r:.60}"
            )
        head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(head):
            plumbing.fail("the chat template renders the prompt differently with and without the completion")
        completion = full[len(head) :]
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]


def encode_demonstration(tok, row, columns: list[str]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a demonstration in the column set load_splits found:
    {prompt, completion}, {messages} (the last message is the completion) or {text} (no prompt: [] or [BOS])."""
    if columns == ["messages"]:
        prompt, completion = row["messages"][:-1], row["messages"][-1:]
    elif columns == ["text"]:
        prompt, completion = "", row["text"]
    else:
        prompt, completion = row["prompt"], row["completion"]
    return encode_prompt(tok, prompt) if prompt else tok("")["input_ids"], encode_completion(tok, prompt, completion)


class Pair(NamedTuple):
    """A tokenised preference pair. Ids are array("i"): one machine int a token, not a Python object each."""

    prompt: array
    chosen: array  # each response ends with EOS
    rejected: array
    extras: list[float]  # the numeric columns asked for (margins, soft labels)
    row: int  # the row of the dataset it came from


def tokenize_pairs(tok, rows, max_length: int, extra_columns=()) -> list[Pair]:
    """The pairs of {prompt, chosen, rejected} rows; those over max_length tokens are dropped, counted."""
    out = []
    for i, row in enumerate(rows):
        for k in extra_columns:
            if not isinstance(row[k], (int, float)) or isinstance(row[k], bool) or not np.isfinite(row[k]):
                plumbing.fail(f"column {k!r} must hold a finite number in every row, not {row[k]!r:.40}")
        p = encode_prompt(tok, row["prompt"])
        c, r = (encode_completion(tok, row["prompt"], row[k]) for k in ("chosen", "rejected"))
        if len(p) + max(len(c), len(r)) <= max_length:
            out.append(Pair(array("i", p), array("i", c), array("i", r), [float(row[k]) for k in extra_columns], i))
    if len(out) < len(rows):
        print(f"note: {len(rows) - len(out)} of {len(rows)} pairs longer than max_length {max_length} dropped")
    if not out:
        plumbing.fail(f"no pair fits in max_length {max_length}")
    return out


class Unpaired(NamedTuple):
    """A tokenised response judged alone: its rating, or its thumbs (1.0 up, 0.0 down)."""

    prompt: array
    completion: array  # ends with EOS
    value: float
    row: int


def tokenize_unpaired(tok, rows, column: str, max_length: int, is_valid, what: str) -> list[Unpaired]:
    """The responses of {prompt, completion, column} rows, every value passing is_valid (else one line: it is not
    `what`); those over max_length tokens are dropped, counted."""
    out = []
    for i, row in enumerate(rows):
        if not is_valid(row[column]):
            plumbing.fail(f"column {column!r} must hold {what}, not {row[column]!r:.40}")
        p, c = encode_prompt(tok, row["prompt"]), encode_completion(tok, row["prompt"], row["completion"])
        if len(p) + len(c) <= max_length:
            out.append(Unpaired(array("i", p), array("i", c), float(row[column]), i))
    if len(out) < len(rows):
        print(f"note: {len(rows) - len(out)} of {len(rows)} responses longer than max_length {max_length} dropped")
    if not out:
        plumbing.fail(f"no response fits in max_length {max_length}")
    return out


# ---- padding and batching ------------------------------------------------------------------------------
def pad(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """(ids, mask) as tensors: left padding for generation, right padding for training (detail 2). Widths are
    multiples of 8, so few distinct shapes recur (kernels are cached per shape)."""
    width = -(-max(len(s) for s in seqs) // 8) * 8
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def pad_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Right-padded prompt + completion ids, attention mask, and the mask of completion tokens."""
    ids, mask = pad([p + c for p, c in zip(prompts, completions, strict=True)], pad_id)
    completion_mask, _ = pad([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions, strict=True)], 0)
    return ids, mask, completion_mask


def length_grouped_batches(lengths, batch_size: int, rng: np.random.Generator, group: int = 64):
    """Shuffled batches of similar length (sorted inside windows of `group` batches): less padding."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * group):
        window = sorted(order[start : start + batch_size * group], key=lambda i: -lengths[i])
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at the first real token (detail 2)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def forward(model, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    """A forward pass of padded sequences (no KV cache): the attention mask, and positions that ignore padding."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, **kwargs)


# ---- log-probs and scores --------------------------------------------------------------------------------
LOGITS_PER_BLOCK = 2**20
"""in_row_blocks works through a batch in blocks of rows holding about this many logits"""


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], as the gathered logit minus logsumexp: no log_softmax copy (detail 4)."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def in_row_blocks(fn, logits: torch.Tensor, *tensors: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fn(fp32 logits / T, *tensors) over (B, T, V) logits one block of rows at a time, concatenated.

    The fp32 copy of the logits and the temporaries of logsumexp exist for one block only: with a 50k-150k
    vocabulary the full copy would be a step's largest tensor. With gradients, a block's forward is re-run in
    the backward (torch.utils.checkpoint), so only the logits themselves are kept for it."""

    def on_block(x, *ts):
        return fn(x.float() if temperature == 1 else x.float() / temperature, *ts)

    rows = max(1, LOGITS_PER_BLOCK // (logits.shape[1] * logits.shape[2]))
    recompute = torch.is_grad_enabled() and logits.requires_grad
    blocks = zip(logits.split(rows), *(t.split(rows) for t in tensors), strict=True)
    return torch.cat(
        [
            checkpoint(on_block, *block, use_reentrant=False, preserve_rng_state=False)
            if recompute
            else on_block(*block)
            for block in blocks
        ]
    )


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of (B, T, V) logits at a temperature (details 3 and 4), in blocks of rows."""
    return in_row_blocks(token_logprobs, logits, tokens, temperature=temperature)


def forward_logprobs(model, ids, mask, temperature: float = 1.0, keep: int = 0):
    """Per-token log-probs of ids[:, 1:] under the model: (B, T-1), or of the last `keep` tokens."""
    logits = forward(model, ids, mask, logits_to_keep=keep + 1 if keep else 0).logits[:, :-1]
    return logprobs_from_logits(logits, ids[:, -logits.shape[1] :], temperature)


def completion_logps(model, prompts, completions, pad_id: int, device):
    """Summed log-probs of each completion given its prompt, and its number of tokens: (B,), (B,). Logits are
    made only from the end of the shortest prompt on: the LM head skips prompt-only positions."""
    ids, mask, completion_mask = (t.to(device) for t in pad_completions(prompts, completions, pad_id))
    keep = min(ids.shape[1] - min(len(p) for p in prompts), ids.shape[1] - 1)
    logp = forward_logprobs(model, ids, mask, keep=keep)  # log-probs of ids[:, -keep:]
    return (logp * completion_mask[:, -keep:]).sum(1), completion_mask[:, -keep:].sum(1)


def sequence_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A one-label sequence classifier's score of each left- or right-padded sequence, read by transformers at
    the last real token (details 6 and 8)."""
    return forward(model, ids, mask).logits[:, 0].float()


# ---- sampling ----------------------------------------------------------------------------------------------
def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """Everything after the first EOS becomes pad (detail 10). Returns (responses, mask, has_eos)."""
    idx = torch.arange(responses.shape[1], device=responses.device)
    first = torch.where(responses == eos_id, idx, responses.shape[1]).min(-1).values  # the row length: no EOS
    mask = (idx[None] <= first[:, None]).long()
    return torch.where(mask.bool(), responses, pad_id), mask, first < responses.shape[1]


@torch.inference_mode()
def sample(model, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float, eos_id: int, stop_at_eos=False):
    """Sample with a KV cache from left-padded prompts: pure sampling at a temperature (top_k 0, top_p 1).
    Returns the (B, max_new_tokens) tokens drawn; truncate_after_eos() applies the EOS trick to them. With
    stop_at_eos it stops early once every row has an EOS (checked every 8 tokens).

    The cache is static (prompt + max_new_tokens long), so every decoding step has the same shapes: no
    concatenation per token, and cached kernels are reused. Causality masks the future positions, so the
    attention mask can cover the whole length from the start."""
    from transformers import StaticCache

    B, Q = prompt_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=Q + max_new_tokens)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], 1)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    step_ids, step_pos, tokens = prompt_ids, position_ids(prompt_mask), []
    for t in range(max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            cache=cache,
            logits_to_keep=1,
        ).logits[:, -1]
        probs = torch.softmax(logits.float() / temperature, -1)
        # Inverse-CDF draw: one uniform number per row, where torch.multinomial draws one per vocabulary entry.
        # The cumulative sum is in float64, so tiny probabilities of a large vocabulary keep their share.
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


# ---- the learning rate --------------------------------------------------------------------------------------
def warmup_cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    """The learning rate's factor: linear from 0 over warmup_steps, then a half cosine to 0 at total_steps, as
    transformers' get_cosine_schedule_with_warmup (written out here: importing it also imports peft)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- several processes: the collectives ---------------------------------------------------------------
# torchrun sets RANK and WORLD_SIZE for each process it starts, and every rank runs the whole script on its share
# of every batch (details 28 and 29). `python script.py` is one process, rank 0 of 1: each helper is the identity.
DISTRIBUTED = "RANK" in os.environ and "WORLD_SIZE" in os.environ
RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(items: list) -> list:
    """This rank's share of `items`: contiguous and of equal size on every rank (the last shares are topped up
    with copies of the last item), so every rank runs as many forward passes: a sharded forward is a collective.
    gather(results)[: len(items)] puts per-item results back in order, without the copies."""
    k = -(-len(items) // WORLD_SIZE)
    part = list(items[RANK * k : (RANK + 1) * k])
    return part + list(items[-1:]) * (k - len(part))


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not DISTRIBUTED:
        return list(items)
    parts = [None] * WORLD_SIZE
    torch.distributed.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over ranks (x itself in one process)."""
    if not DISTRIBUTED:
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x)
    return x


@contextmanager
def gathered(*models):
    """Whole models on every rank for the block (sampling): their forward passes then need no other rank, so each
    rank can stop sampling when its own rows are done (FSDP2 would otherwise gather each layer's weights anew)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)] if DISTRIBUTED else []
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def seed_sampling(seed: int):
    """Each rank samples from seed + rank * 100003 (detail 27), set once the models are made alike on every rank."""
    if DISTRIBUTED:
        torch.manual_seed(seed + RANK * 100003)


def barrier():
    if DISTRIBUTED:
        torch.distributed.barrier()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm (over all ranks' shards); the norm before clipping, a plain tensor."""
    return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value on every rank (every rank must call it); x itself in one process."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def assign(param: torch.Tensor, value: torch.Tensor):
    """Set a parameter, sharded or not, to `value`, the whole tensor (the same on every rank)."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        param.copy_(value)


# ---- LoRA: the adapters, the model without them, the merged weights --------------------------------------
def add_lora(model, args, heads=(), bf16=False):
    """LoRA (Hu et al. 2021) in place: adapters of rank args.lora_r on the layers args.lora_target_modules names (by
    default every linear layer inside the transformer blocks, by the model's own module names), in fp32, the base
    frozen (bf16 on CUDA with bf16). Each of the `heads` (e.g. "score") gets a copy trained in full, used while the
    adapters are on; the original serves with them off (WithoutAdapters). Without --lora_r: the model."""
    if not args.lora_r:
        return model
    from peft import LoraConfig, inject_adapter_in_model

    blocks = [m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or ())]
    linear = {
        n.split(".")[-1] for b in blocks for n, m in b.named_modules() if type(m).__name__ in ("Linear", "Conv1D")
    }
    targets = list(args.lora_target_modules or sorted(linear))
    if not set(targets) <= linear:
        plumbing.fail(
            f"--lora_target_modules {sorted(set(targets) - linear)}: not among the model's layers {sorted(linear)}"
        )
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=list(heads) or None,
    )
    inject_adapter_in_model(config, model)  # every other weight is frozen
    for p in model.parameters():
        if bf16 and not p.requires_grad and p.device.type == "cuda":
            p.data = p.data.to(torch.bfloat16)
    model.lora_config = config
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"note: LoRA r={args.lora_r} on {', '.join(targets)}: {trained / 1e6:.3f}M parameters trained")
    return model


class WithoutAdapters:
    """A LoRA model (add_lora) called with its adapters switched off: the model it started from, with no
    second copy of its weights in memory. The reference of a LoRA policy (detail 26 holds: the same weights, the
    same dtype), and PPO's reward model under its value model's adapters. Every other attribute is the model's."""

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper  # a head's trained copy (modules_to_save)

        adapted = (BaseTunerLayer, AuxiliaryTrainingWrapper)
        self.model, self.layers = model, [m for m in model.modules() if isinstance(m, adapted)]

    def __call__(self, *args, **kwargs):
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            return self.model(*args, **kwargs)
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)

    def __getattr__(self, name):
        return getattr(self.model, name)


def merged_weights(model, weights=None) -> dict:
    """A LoRA model's weights as the plain model's, under the plain names: each adapted layer's W + (lora_alpha / r)
    B A (Hu et al. eq. 3) in fp32, each head's trained copy (`weights`: under torchrun, the gathered ones)."""
    weights = model.state_dict() if weights is None else weights
    scale, merged = model.lora_config.lora_alpha / model.lora_config.r, {}
    for name, w in weights.items():
        layer, _, param = name.partition(".base_layer.")
        if param == "weight":  # the frozen weight of an adapted layer
            a, b = weights[f"{layer}.lora_A.default.weight"], weights[f"{layer}.lora_B.default.weight"]
            w = w.float() + scale * (b.float() @ a.float())
        if ".lora_" not in name and ".original_module." not in name:
            name = f"{layer}.{param}" if param else name.replace(".modules_to_save.default.", ".")
            merged[name] = w.float() if w.is_floating_point() else w
    return merged


# ---- evaluation --------------------------------------------------------------------------------------------
def plain_text(x) -> str:
    """A prompt or response as a reader outside the chat template reads it (the gold scorer, an AI labeller): plain
    text as is; of chat messages the non-system turns (a system message instructs the policy, not the reader), one
    message as its content, several as "role: content" lines."""
    if isinstance(x, str):
        return x
    turns = [m for m in x if m["role"] != "system"]
    return turns[0]["content"] if len(turns) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of a set of samples: low means the samples repeat."""
    grams = [tuple(w[i : i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def bind_probe(probe, rows: list[dict]):
    """probe(rows, responses) -> metrics, bound to the eval prompts' dataset rows (evaluate() passes the responses
    to the first len(responses) prompts); tried at once, so that rows without its fields fail before training."""
    if probe is None:
        return None
    probe(rows, [""] * len(rows))
    return lambda responses: probe(rows[: len(responses)], responses)


@torch.inference_mode()
def evaluate(policy, tok, prompts, args, autocast=None, ref=None, gold_scorer=None, reward_model=None, probe=None):
    """Sample once per held-out prompt from the policy (and from the reference, on the same prompts) with the
    script's max_new_tokens, eval_temperature and eval_batch_size, and score the samples. Returns (metrics,
    samples), with the keys every script's eval.json shares: eos_rate, mean_length, distinct_2; given a reference,
    kl_to_ref (mean over samples of sum_t log pi(y_t) - log pi_ref(y_t) on the policy's own samples: an unbiased
    estimate of KL(pi || pi_ref)); given a reward model, rm_score; given the task's gold_scorer (prompts,
    responses) -> scores, gold_score and, with a reference, gold_score_ref and gold_win_rate_vs_ref (pairwise on
    the same prompt, ties count half); given a probe bound to the prompts' rows (bind_probe), its metrics of the
    samples (with a reference, also of its samples, as name_ref)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in policy.parameters()]  # this rank's shards
    if reduce_sum(torch.stack([~torch.isfinite(p).all() for p in local]).any().float()) > 0:  # an update blew up
        plumbing.fail("the policy's weights are not finite (an update exploded): stopped before saving the model")
    device, eos, pad_id = local[0].device, tok.eos_token_id, tok.pad_token_id
    max_new_tokens, temperature, batch_size = args.max_new_tokens, args.eval_temperature, args.eval_batch_size
    autocast = autocast or nullcontext()
    texts, ref_texts, lengths, has_eos, kls, rm_scores = [], [], [], [], [], []
    local_prompts = shard(prompts)  # under torchrun each rank samples its share of the prompts; in one process all
    for i in range(0, len(local_prompts), batch_size):
        ids, mask = (t.to(device) for t in pad(local_prompts[i : i + batch_size], pad_id, "left"))
        with autocast:
            with gathered(policy):  # each rank stops at its own rows' EOS
                raw = sample(policy, ids, mask, max_new_tokens, temperature, eos, stop_at_eos=True)
            responses, response_mask, eos_found = truncate_after_eos(raw, eos, pad_id)
            seq, seq_mask = torch.cat([ids, responses], 1), torch.cat([mask, response_mask], 1)
            if reward_model is not None:
                rm_scores += sequence_scores(reward_model, seq, seq_mask).tolist()
            if ref is not None:
                n = responses.shape[1]
                logprobs = forward_logprobs(policy, seq, seq_mask, temperature, n)
                kl = logprobs - forward_logprobs(ref, seq, seq_mask, temperature, n)
                kls += (kl * response_mask).sum(1).tolist()
                with gathered(ref):
                    raw = sample(ref, ids, mask, max_new_tokens, temperature, eos, stop_at_eos=True)
                ref_texts += tok.batch_decode(truncate_after_eos(raw, eos, pad_id)[0], skip_special_tokens=True)
        texts += tok.batch_decode(responses, skip_special_tokens=True)
        lengths += response_mask.sum(1).tolist()
        has_eos += eos_found.tolist()
    # every rank's results in prompt order, without shard()'s copies
    texts, ref_texts, lengths, has_eos, kls, rm_scores = (
        gather(x)[: len(prompts)] for x in (texts, ref_texts, lengths, has_eos, kls, rm_scores)
    )
    metrics = {
        "eos_rate": float(np.mean(has_eos)),
        "mean_length": float(np.mean(lengths)),
        "distinct_2": distinct_n(texts),
    }
    prompt_texts = tok.batch_decode(prompts, skip_special_tokens=True)
    samples = [{"prompt": p, "response": r} for p, r in zip(prompt_texts, texts, strict=True)]
    if ref is not None:
        metrics["kl_to_ref"] = float(np.mean(kls))
    if reward_model is not None:
        metrics["rm_score"] = float(np.mean(rm_scores))
    if gold_scorer is not None:
        scores = np.array(gold_scorer(prompt_texts, texts), dtype=float)
        metrics["gold_score"] = float(scores.mean())
        for s, g in zip(samples, scores, strict=True):
            s["gold"] = round(float(g), 3)
        if ref is not None:
            ref_scores = np.array(gold_scorer(prompt_texts, ref_texts), dtype=float)
            metrics["gold_score_ref"] = float(ref_scores.mean())
            metrics["gold_win_rate_vs_ref"] = float(np.mean((scores > ref_scores) + 0.5 * (scores == ref_scores)))
    if probe is not None:  # a world's own held-out metrics, read from the rows' fields (data.sycophancy:probe)
        metrics.update(probe(texts))
        if ref is not None:
            metrics.update({f"{k}_ref": v for k, v in probe(ref_texts).items()})
    return metrics, samples
