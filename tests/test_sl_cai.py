"""sl_cai.py: Constitutional AI's first stage. The critique and revision conversations as documented, the dataset
of final revisions that sft.py trains on, and a user's mistakes.

    python -m pytest -q tests/test_sl_cai.py
"""

import json
import os

import pytest

import common
import sl_cai
from conftest import WORLD, one_line_error, read_jsonl, run

REQUESTS = sl_cai.load_revision_requests(sl_cai.Args.revision_requests)


@pytest.fixture(scope="module")
def tok():
    return common.load_tokenizer(f"{WORLD}/base")


def test_critique_and_revision_requests_are_asked_as_documented(tok):
    request = REQUESTS[0]
    prompt = [{"role": "system", "content": "Continue the review."}, {"role": "user", "content": "I saw Heat."}]
    critique = sl_cai.critique_messages(prompt, "It was fine.", request)
    assert critique == [
        *prompt,
        {"role": "assistant", "content": "It was fine."},
        {"role": "user", "content": request["critique"]},
    ]
    revision = sl_cai.revision_messages(prompt, "It was fine.", request, "Too lukewarm.")
    assert revision == [
        *critique,
        {"role": "assistant", "content": "Too lukewarm."},
        {"role": "user", "content": request["revision"]},
    ]
    # a text prompt is the user's message; the conversation reaches the model through its chat template
    assert sl_cai.critique_messages("I saw Heat.", "Fine.", request)[0] == {"role": "user", "content": "I saw Heat."}
    text = tok.decode(common.encode_prompt(tok, sl_cai.revision_messages("I saw Heat.", "Fine.", request, "Cold.")))
    assert text.index("I saw Heat.") < text.index("Fine.") < text.index(request["critique"]) < text.index("Cold.")
    assert text.index("Cold.") < text.index(request["revision"]) and text.endswith("Assistant:")
    # every request of the world's file comes in a pair
    assert len(REQUESTS) >= 2 and all(set(r) == {"critique", "revision"} for r in REQUESTS)


def test_revisions_become_a_dataset_that_sft_trains_on(sft_model, tmp_path):
    out = tmp_path / "revised"
    args = ["--model_name_or_path", sft_model, "--max_prompts", 16, "--batch_size", 8, "--response_length", 64]
    run("sl_cai.py", *args, "--output_dir", out)
    figures = json.load(open(out / "revision.json"))
    records, dataset = read_jsonl(out / "revisions.jsonl"), read_jsonl(out / "train.jsonl")
    dropped = sum(v for k, v in figures.items() if k.startswith("dropped_revision_"))
    assert figures["prompts"] == len(records) == 16 and figures["kept"] == len(dataset) == 16 - dropped
    assert figures["responses_cut"] == sum(r["response_cut"] for r in records)
    assert len(dataset) > 0 and all(set(row) == {"prompt", "completion"} for row in dataset)
    pairs = [(r["critique"], r["revision"]) for r in REQUESTS]
    kept = [r for r in records if len(r["rounds"]) == 2 and not r["rounds"][-1]["revision_cut"]]
    assert [r["prompt"] for r in kept] == [row["prompt"] for row in dataset]
    for record, row in zip(kept, dataset, strict=True):
        assert row["completion"] == record["rounds"][-1]["revision"]  # the final revision is the demonstration
        for r in record["rounds"]:  # the intermediate critiques and revisions are kept, each under its pair
            assert (r["critique_request"], r["revision_request"]) in pairs and isinstance(r["critique"], str)
    for stage in ("response", "revision_1", "revision_2"):
        assert f"{stage}_gold_score" in figures and f"{stage}_distinct_2" in figures
    run("sft.py", "--model_name_or_path", sft_model, "--dataset_name", out, "--output_dir", tmp_path / "sl_cai",
        "--max_steps", 2, "--batch_size", 4, "--micro_batch_size", 4, "--eval_every", 1000,
        "--num_eval_prompts", 2, "--max_new_tokens", 4, "--learning_rate", 1e-5)  # fmt: skip


def test_mistakes(sft_model, tmp_path):
    plain = tmp_path / "no_template"  # the SFT model with its tokenizer's chat template removed
    plain.mkdir()
    for f in os.listdir(sft_model):
        if f != "chat_template.jinja":
            (plain / f).write_bytes(open(os.path.join(sft_model, f), "rb").read())
    config = json.load(open(plain / "tokenizer_config.json"))
    config.pop("chat_template", None)
    json.dump(config, open(plain / "tokenizer_config.json", "w"))
    args = ["--max_prompts", 4, "--output_dir", tmp_path / "out"]
    one_line_error(run("sl_cai.py", *args, "--model_name_or_path", plain, ok=False), "no chat template")
    principles = tmp_path / "principles.txt"  # a constitution of principles is not a file of request pairs
    principles.write_text("Choose the kinder response.\n")
    proc = run("sl_cai.py", *args, "--model_name_or_path", sft_model, "--revision_requests", principles, ok=False)
    one_line_error(proc, "--revision_requests", "critique")
    one_line_error(run("sl_cai.py", *args, "--num_revisions", 0, ok=False), "--num_revisions")
    assert not os.path.exists(tmp_path / "out")
