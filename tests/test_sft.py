"""sft.py from the command line: end to end, the data formats, learning, and a user's mistakes."""

import ast
import json
import os
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import plumbing
import sft
from conftest import ENV, ROOT, WORLD, one_line_error, read_jsonl, run, world_subset, write_jsonl

QUICK = [
    "--max_steps",
    4,
    "--batch_size",
    8,
    "--micro_batch_size",
    4,
    "--num_eval_prompts",
    8,
    "--max_new_tokens",
    16,
    "--eval_every",
    2,
]


def test_sft_end_to_end_writes_a_model_plain_transformers_loads(small_sft, tmp_path):
    out = tmp_path / "sft"
    proc = run("sft.py", "--dataset_name", small_sft, "--output_dir", out, *QUICK)
    assert "step 2: eval/loss" in proc.stdout  # held-out loss and sample generations during training
    results = json.load(open(out / "eval.json"))
    assert {"loss", "eos_rate", "gold_score"} <= set(results)
    assert json.load(open(out / "run.json"))["script"] == "sft.py"
    assert sorted(os.listdir(tmp_path)) == ["sft"]  # no temporary directory left behind
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("I saw The Silent Harbor at the cinema last night.", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_sft_learns_to_write_reviews_that_end(sft_model):
    """The session's 300-step SFT (trained from random init) stops by itself and models the held-out text."""
    results = json.load(open(os.path.join(sft_model, "eval.json")))
    assert results["eos_rate"] >= 0.9
    assert results["loss"] < 1.7  # a random model starts at ln(vocab) = 7.6
    samples = read_jsonl(os.path.join(sft_model, "samples.jsonl"))
    assert sum(s["response"].strip().endswith(".") for s in samples) > 0.8 * len(samples)


def test_a_task_plugs_in_its_own_gold_scorer(small_sft, tmp_path):
    """--gold_scorer names any (prompts, responses) -> scores function; the evaluation reports its mean as
    gold_score, and the offline world's rater is not used."""
    (tmp_path / "my_task_scorer.py").write_text(
        "def score(prompts, responses):\n    return [len(r) + 0.5 * (p != '') for p, r in zip(prompts, responses)]\n"
    )
    out = tmp_path / "sft"
    env = dict(ENV, PYTHONPATH=str(tmp_path))
    run(
        "sft.py",
        "--dataset_name",
        small_sft,
        "--output_dir",
        out,
        *QUICK,
        "--gold_scorer",
        "my_task_scorer:score",
        env=env,
    )
    samples = read_jsonl(out / "samples.jsonl")
    want = [len(s["response"]) + 0.5 for s in samples]
    assert [s["gold"] for s in samples] == want
    assert json.load(open(out / "eval.json"))["gold_score"] == pytest.approx(sum(want) / len(want))


def test_shared_modules_do_not_import_the_world():
    """common.py, plumbing.py and the scripts serve any task: none imports data/ (the scripts reach the world's
    gold rater only through --gold_scorer)."""
    for name in ("common.py", "plumbing.py", "sft.py", "reward.py", "dpo.py", "ppo.py", "rlaif.py"):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "gold" not in imported and not [m for m in imported if m and m.split(".")[0] == "data"], name


def test_completion_only_loss_mask():
    tok = common.load_tokenizer(f"{WORLD}/base")
    rows = [{"prompt": "I saw The Film.", "completion": " It is great."}]
    ((p, c),) = sft.tokenize(tok, rows, ["prompt", "completion"], 256)
    ids, mask, loss_mask = common.pad_completions([p, p], [c, c[:2]], tok.pad_token_id)
    assert tok.decode(c) == " It is great.<|eos|>"
    width = ids.shape[1]  # the longest row, rounded up to a multiple of 8
    assert width % 8 == 0 and width - 8 < len(p) + len(c) <= width
    assert loss_mask[0].tolist() == [0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c))
    assert loss_mask[1].tolist() == [0] * len(p) + [1, 1] + [0] * (width - len(p) - 2)
    assert (ids[1, len(p) + 2 :] == tok.pad_token_id).all()


def test_conversational_formats(tmp_path):
    tok = common.load_tokenizer(f"{WORLD}/base")
    rows = read_jsonl(f"{WORLD}/sft/train.jsonl")[:64]
    users = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    assistants = [[{"role": "assistant", "content": r["completion"].strip()}] for r in rows]
    messages = [{"messages": u + a} for u, a in zip(users, assistants, strict=True)]
    pairs = [{"prompt": u, "completion": a} for u, a in zip(users, assistants, strict=True)]
    # both render the same tokens: the chat-templated prompt, and the assistant's answer + EOS
    ((p1, c1),) = sft.tokenize(tok, messages[:1], ["messages"], 256)
    ((p2, c2),) = sft.tokenize(tok, pairs[:1], ["prompt", "completion"], 256)
    assert (p1, c1) == (p2, c2)
    assert tok.decode(p1).startswith("User: ") and tok.decode(p1).endswith("Assistant:")
    assert tok.decode(c1) == " " + rows[0]["completion"].strip() + "<|eos|>"
    for name, data in (("messages", messages), ("pairs", pairs)):
        out = tmp_path / name
        run("sft.py", "--dataset_name", write_jsonl(tmp_path / f"{name}.jsonl", data), "--output_dir", out, *QUICK)
        assert json.load(open(out / "eval.json"))["eos_rate"] >= 0


def test_text_format(tmp_path):
    rows = [{"text": r["prompt"] + r["completion"]} for r in read_jsonl(f"{WORLD}/sft/train.jsonl")[:64]]
    run(
        "sft.py", "--dataset_name", write_jsonl(tmp_path / "text.jsonl", rows), "--output_dir", tmp_path / "out", *QUICK
    )
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


def test_train_loss_averages_over_the_tokens_it_predicts(tmp_path):
    """With the learning rate at 0 and the held-out split equal to the training rows, one step over all rows
    logs the held-out loss: both average over the tokens the model predicts ({"text"} rows have no prompt,
    so not their first), in micro-batches of 6, 6 and 4 (6 does not divide the batch of 16)."""
    rows = [{"text": r["prompt"] + r["completion"]} for r in read_jsonl(f"{WORLD}/sft/train.jsonl")[:16]]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "test.jsonl", rows)
    out = tmp_path / "out"
    run(
        "sft.py",
        "--dataset_name",
        data,
        "--output_dir",
        out,
        "--max_steps",
        1,
        "--batch_size",
        16,
        "--micro_batch_size",
        6,
        "--learning_rate",
        0,
        "--num_eval_prompts",
        2,
        "--max_new_tokens",
        4,
        "--gold_scorer",
        "None",
    )
    train_loss = read_jsonl(out / "metrics.jsonl")[0]["train/loss"]
    assert abs(train_loss - json.load(open(out / "eval.json"))["loss"]) < 1e-4


# ---- a user's mistakes: one line naming the problem, nothing written (every script and every mistake:
# test_reliability.py's bad-input matrix; here the real command line once) -------------------------
def test_missing_path(tmp_path):
    one_line_error(
        run("sft.py", "--dataset_name", tmp_path / "nope.jsonl", "--output_dir", tmp_path / "o", ok=False),
        "nope.jsonl",
        "does not exist",
    )
    one_line_error(
        run("sft.py", "--model_name_or_path", tmp_path / "no_model", "--output_dir", tmp_path / "o", ok=False),
        "no_model",
    )
    assert not os.path.exists(tmp_path / "o")


def test_prompts_over_the_length_limit(tmp_path):
    """Some prompts too long: those rows are dropped and counted (all too long is an error: the bad-input
    matrix in test_reliability.py)."""
    rows = read_jsonl(f"{WORLD}/sft/train.jsonl")[:40]
    long = [{"prompt": r["prompt"] * 20, "completion": r["completion"]} for r in rows]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", long[:10] + rows[10:])
    proc = run("sft.py", "--dataset_name", mixed, "--output_dir", tmp_path / "o", "--max_length", 64, *QUICK)
    said = re.findall(r"note: (train|eval): (\d+) rows dropped \(prompt >= max_length 64\)", proc.stdout)
    assert sum(int(n) for _, n in said) == 10


def test_tokenizer_without_a_pad_token_gets_one(small_sft, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(f"{WORLD}/base", base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.eos_token  # the habit detail 1 warns against: pad = EOS
    tok.save_pretrained(base)
    proc = run(
        "sft.py", "--model_name_or_path", base, "--dataset_name", small_sft, "--output_dir", tmp_path / "o", *QUICK
    )
    assert "had no pad token distinct from EOS" in proc.stdout
    saved = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert saved.pad_token_id is not None and saved.pad_token_id != saved.eos_token_id


def test_load_model_resizes_embeddings_for_an_added_pad_token(tmp_path):
    tok = AutoTokenizer.from_pretrained(f"{WORLD}/base")
    model = AutoModelForCausalLM.from_config(__import__("transformers").AutoConfig.from_pretrained(f"{WORLD}/base"))
    model.save_pretrained(tmp_path / "m")
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    loaded = plumbing.load_model(AutoModelForCausalLM, str(tmp_path / "m"), tok, torch.device("cpu"))
    assert loaded.get_input_embeddings().num_embeddings == len(tok)


def test_a_directory_without_a_config_is_one_line(tmp_path):
    """Tokenizer files and no config.json: not a model directory, said in one line (it was a traceback)."""
    AutoTokenizer.from_pretrained(f"{WORLD}/base").save_pretrained(tmp_path / "tokenizer_only")
    one_line_error(
        run("sft.py", "--model_name_or_path", tmp_path / "tokenizer_only", "--output_dir", tmp_path / "o", ok=False),
        "tokenizer_only",
        "no config.json",
    )


def test_gpt2_family_checkpoints_load(small_sft, tmp_path):
    """GPT-2's causal LM class is GPT2LMHeadModel: which head a checkpoint has is what the Auto class maps its
    config to, not a class-name suffix. SFT trains it, reward.py puts a classification head on it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(f"{WORLD}/base")
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    run("sft.py", "--model_name_or_path", tmp_path / "gpt2", "--dataset_name", small_sft,
        "--output_dir", tmp_path / "sft", *QUICK)  # fmt: skip
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "sft")).__name__ == "GPT2LMHeadModel"
    pairs = world_subset(tmp_path / "pairs", "preference", 64, 16)
    run("reward.py", "--model_name_or_path", tmp_path / "sft", "--dataset_name", pairs, "--sft_dataset_name",
        small_sft, "--max_steps", 2, "--batch_size", 8, "--num_normalisation_rows", 16, "--output_dir",
        tmp_path / "rm")  # fmt: skip
    assert json.load(open(tmp_path / "rm" / "config.json"))["architectures"] == ["GPT2ForSequenceClassification"]


def test_a_failed_run_keeps_the_previous_output(small_sft, tmp_path):
    out = tmp_path / "sft"
    run("sft.py", "--dataset_name", small_sft, "--output_dir", out, *QUICK)
    before = open(out / "model.safetensors", "rb").read()
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(run("sft.py", "--dataset_name", tmp_path / "empty.jsonl", "--output_dir", out, ok=False))
    assert open(out / "model.safetensors", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl", "sft"]
