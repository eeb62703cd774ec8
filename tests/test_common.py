"""common.py (its data loading included) against plain, independent formulas."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import common
from conftest import WORLD

PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def reference_logprobs(model, seq):
    """log p(seq[t] | seq[:t]) from an unpadded forward and a full log_softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1]
    return torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]


@pytest.mark.parametrize("side", ["left", "right"])
def test_logprobs_of_padded_batch_equal_unpadded(tiny, side):
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    ids, mask = common.pad(seqs, PAD, side)
    with torch.no_grad():
        logp = common.forward_logprobs(tiny, ids, mask)
    for i, s in enumerate(seqs):  # right padding: the real predictions come first; left: they come last
        got = logp[i, : len(s) - 1] if side == "right" else logp[i, -(len(s) - 1) :]
        torch.testing.assert_close(got, reference_logprobs(tiny, s), atol=1e-5, rtol=1e-4)


def test_logprobs_keep_last_tokens(tiny):
    ids, mask = common.pad([[5, 6, 7, 8, 9], [10, 11, 12]], PAD, "left")
    with torch.no_grad():
        full = common.forward_logprobs(tiny, ids, mask)
        last = common.forward_logprobs(tiny, ids, mask, keep=2)
    torch.testing.assert_close(last, full[:, -2:])


def test_logprobs_from_logits_with_temperature():
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    for t in (1.0, 0.7):
        want = torch.log_softmax(logits / t, -1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(common.logprobs_from_logits(logits, tokens, t), want)


def test_logprobs_in_blocks_match_log_softmax_and_keep_no_fp32_copy(monkeypatch):
    """Blocks of rows (an uneven last one), temperature, gradients; bf16 logits keep no fp32 copy for the backward."""
    monkeypatch.setattr(common, "LOGITS_PER_BLOCK", 2 * 7 * 50)  # 2 rows per block: blocks of 2, 2, 1
    torch.manual_seed(0)
    logits, tokens = torch.randn(5, 7, 50, requires_grad=True), torch.randint(0, 50, (5, 7))
    weights = torch.randn(5, 7)
    for t in (1.0, 0.7):
        want = torch.log_softmax(logits / t, -1).gather(-1, tokens[..., None])[..., 0]
        (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
        got = common.logprobs_from_logits(logits, tokens, t)
        (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)
    saved = []
    half = logits.detach().bfloat16().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        got = common.logprobs_from_logits(half, tokens)
    assert not [x for x in saved if x.dtype == torch.float32 and x.numel() >= 7 * 50], "an fp32 copy was kept"
    got.sum().backward()
    want = torch.log_softmax(half.float(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(got, want)
    # d(sum of log-probs)/d logits = one_hot(token) - softmax
    want_grad = torch.nn.functional.one_hot(tokens, 50) - torch.softmax(half.float(), -1)
    torch.testing.assert_close(half.grad.float(), want_grad, atol=1e-2, rtol=0)
    with torch.no_grad():  # the inference path: the same values
        want = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(common.logprobs_from_logits(logits, tokens), want)


def test_pad_sides():
    """Padded to the next multiple of 8: left for generation, right for training."""
    ids, mask = common.pad([[3, 4, 5], [6]], PAD, "left")
    assert ids.tolist() == [[PAD] * 5 + [3, 4, 5], [PAD] * 7 + [6]] and mask.tolist() == [
        [0] * 5 + [1] * 3,
        [0] * 7 + [1],
    ]
    ids, mask = common.pad([[3, 4, 5], [6]], PAD, "right")
    assert ids.tolist() == [[3, 4, 5] + [PAD] * 5, [6] + [PAD] * 7] and mask.tolist() == [
        [1] * 3 + [0] * 5,
        [1] + [0] * 7,
    ]
    assert common.pad([list(range(8))], PAD)[0].shape == (1, 8) and common.pad([list(range(9))], PAD)[0].shape == (
        1,
        16,
    )
    assert common.position_ids(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_truncate_after_eos():
    responses = torch.tensor([[4, EOS, 5, EOS], [4, 5, 6, 7], [EOS, 4, 4, 4]])
    out, mask, has_eos = common.truncate_after_eos(responses, EOS, PAD)
    assert out.tolist() == [[4, EOS, PAD, PAD], [4, 5, 6, 7], [EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_length_grouped_batches_cover_every_row_once():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(1, 100, size=1000))
    batches = common.length_grouped_batches(lengths, 16, rng, group=8)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    # inside a batch the lengths are close: far less spread than random batches would have
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches if len(b) == 16])
    assert spread < 20


def test_sample_with_kv_cache_matches_full_recompute(tiny):
    """At a tiny temperature sampling is greedy: the KV-cache loop over left-padded prompts must pick the same
    tokens as recomputing every prefix without padding or cache."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, mask = common.pad(prompts, PAD, "left")
    torch.manual_seed(0)
    out = common.sample(tiny, ids, mask, 6, temperature=1e-4, eos_id=EOS)
    for i, p in enumerate(prompts):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(tiny(torch.tensor([seq])).logits[0, -1].argmax()))
        assert out[i].tolist() == seq[len(p) :]


def test_sample_draws_from_the_temperature_scaled_softmax(tiny):
    """The inverse-CDF draw must follow softmax(logits / T): the first token of 20000 samples of one prompt,
    counted per vocabulary entry, against the model's own probabilities (a shift of mass between neighbouring
    tokens, as an off-by-one in the search would make, is many standard errors away)."""
    n, temperature = 20000, 0.5
    ids, mask = common.pad([[5, 6, 7]] * n, PAD, "left")
    with torch.no_grad():
        probs = torch.softmax(tiny(torch.tensor([[5, 6, 7]])).logits[0, -1] / temperature, -1)  # unpadded
    torch.manual_seed(0)
    with torch.inference_mode():
        first = common.sample(tiny, ids, mask, 1, temperature, eos_id=EOS)[:, 0]
    freq = torch.bincount(first, minlength=len(probs)).double() / n
    stderr = (probs * (1 - probs) / n).sqrt()
    assert probs.max() > 2 * probs.min()  # a non-uniform target, so a shifted draw would show
    assert ((freq - probs).abs() <= 5 * stderr + 1e-4).all()


def test_encode_completion_ends_with_one_eos():
    tok = AutoTokenizer.from_pretrained(f"{WORLD}/base")
    ids = common.encode_completion(tok, "The film.", " It is great.")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids[:-1]) == " It is great."
    # conversational: the completion is what follows the rendered prompt, cut after the template's EOS
    prompt = [{"role": "user", "content": "Review The Film."}]
    ids = common.encode_completion(tok, prompt, [{"role": "assistant", "content": "It is great."}])
    assert tok.decode(ids) == " It is great.<|eos|>"
    head = common.encode_prompt(tok, prompt)
    assert tok.decode(head).endswith("Assistant:")


@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (30, 300), (5, 5), (10, 4)])
def test_warmup_cosine_schedule_is_transformers_own(warmup, total):
    """The same learning rate at every step as transformers' get_cosine_schedule_with_warmup, to the bit."""
    from transformers import get_cosine_schedule_with_warmup

    ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4) for _ in range(2))
    ours, theirs = (
        common.warmup_cosine_schedule(ours, warmup, total),
        get_cosine_schedule_with_warmup(theirs, warmup, total),
    )
    for _ in range(total + 3):
        assert ours.get_last_lr() == theirs.get_last_lr()
        ours.optimizer.step(), ours.step(), theirs.optimizer.step(), theirs.step()


def test_distinct_n():
    assert common.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert common.distinct_n(["x x x x"], 2) == pytest.approx(1 / 3)


def test_completion_logps_sum_the_completion_tokens_only(tiny):
    prompts, completions = [[5, 6, 7, 8], [9], []], [[10, 11], [12, 13, 14], [15, 16, 17, 18]]
    with torch.no_grad():
        logps, lengths = common.completion_logps(tiny, prompts, completions, PAD, "cpu")
    assert lengths.tolist() == [2, 3, 3]  # the first token of a prompt-less text has nothing to predict it
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        want = reference_logprobs(tiny, p + c)[-(len(c) if p else len(c) - 1) :].sum()
        assert logps[i].item() == pytest.approx(want.item(), abs=1e-4)


def test_local_json_rows_are_the_rows_datasets_gives(tmp_path):
    """.json/.jsonl data is read with the json module; anything else goes through `datasets`, the hub's path
    (here a directory of parquet files, as the hub stores datasets). Both give the same rows, and the held-out
    rows are those of `datasets`' train_test_split."""
    import json

    from datasets import load_dataset

    lines = open(f"{WORLD}/sft/train.jsonl").read().splitlines()[:200]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n\n")  # a blank last line is no row
    (tmp_path / "rows.json").write_text(json.dumps([json.loads(line) for line in lines]))  # a list of objects
    arrow = load_dataset("json", data_files=str(tmp_path / "rows.jsonl"))["train"]
    (tmp_path / "hub").mkdir()
    arrow.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    columns = [["messages"], ["prompt", "completion"]]
    from_jsonl = common.load_splits(str(tmp_path / "rows.jsonl"), columns, seed=3)
    assert from_jsonl[2] == ["prompt", "completion"] and len(from_jsonl[0]) + len(from_jsonl[1]) == 200
    assert common.load_splits(str(tmp_path / "rows.json"), columns, seed=3) == from_jsonl
    assert common.load_splits(str(tmp_path / "hub"), columns, seed=3) == from_jsonl
    held_out = arrow.train_test_split(test_size=0.05, seed=3)
    assert from_jsonl[:2] == (held_out["train"].to_list(), held_out["test"].to_list())
    # a directory of train/test files: the test split is the eval split, as `datasets` names them
    train, evals, _ = common.load_splits(f"{WORLD}/sft", columns)
    assert (train, evals) == tuple(load_dataset(f"{WORLD}/sft")[s].to_list() for s in ("train", "test"))


def test_json_mistakes_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    (tmp_path / "gap").mkdir()
    (tmp_path / "gap" / "train.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    (tmp_path / "gap" / "test.jsonl").write_text('{"prompt": "c"}\n')
    (tmp_path / "list.json").write_text('[["a"]]')
    for name, words in [
        ("bad.jsonl", "line 2: not JSON"),
        ("gap", "row 1 of train has no 'prompt'"),
        ("list.json", "one JSON object per row"),
    ]:
        with pytest.raises(SystemExit, match=words):
            common.load_splits(str(tmp_path / name), [["prompt"]], eval_fraction=0.5)
