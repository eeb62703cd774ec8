"""The offline world: its gold rater, its splits, its label noise, its model, and that it is reproducible."""

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, WORLD, read_jsonl
from data import make_world
from data.gold import REPETITION_COEF, gold_score, repetition, sentiment


def test_gold_orders_positive_neutral_negative():
    pos = " The acting is brilliant and the score is wonderful. I loved it."
    neu = " It runs about 120 minutes. Most of it was filmed in Lisbon."
    neg = " The plot is boring and the dialogue is awful. I hated it."
    assert gold_score(pos) > gold_score(neu) > gold_score(neg)
    assert gold_score(neu) == 0.0


def test_gold_penalises_repetition():
    assert repetition(" The acting is brilliant.") == 0.0
    assert repetition("great great great great") == pytest.approx(2 / 3)
    spam = " The acting is brilliant. The acting is brilliant. The acting is brilliant."
    assert gold_score(spam) == pytest.approx(sentiment(spam) - REPETITION_COEF * repetition(spam))
    # VADER alone prefers the spam; the gold rater does not
    review = " The acting is brilliant, and the ending made me smile."
    assert sentiment(spam) > sentiment(review) and gold_score(spam) < gold_score(review)
    assert gold_score("great great great great") < gold_score(" It is great.")


def test_every_split_is_disjoint_by_prompt():
    seen = {}
    for name in ("sft", "preference", "prompts", "judge"):
        for split in ("train", "test"):
            rows = read_jsonl(f"{WORLD}/{name}/{split}.jsonl")
            assert len(rows) > 0
            for r in rows:
                p = (
                    r["prompt"]
                    if isinstance(r["prompt"], str)
                    else r["prompt"][0]["content"].split("Prompt: ")[1].split("\n")[0]
                )
                assert p not in seen, f"{p!r} in {name}/{split} and {seen[p]}"
                seen[p] = f"{name}/{split}"


def test_demonstrations_have_mixed_sentiment_and_rarely_repeat():
    rows = read_jsonl(f"{WORLD}/sft/train.jsonl")[:2000]
    scores = np.array([gold_score(r["completion"]) for r in rows])
    assert (scores > 0.5).mean() > 0.2 and (scores < -0.5).mean() > 0.1  # headroom for RL
    assert np.mean([repetition(r["completion"]) for r in rows]) < 0.05


def test_preference_labels_are_noisy_at_the_documented_rate():
    """Labels come from P(a preferred) = sigmoid((gold(a) - gold(b)) / LABEL_TEMPERATURE): the observed share
    of pairs where the gold rater agrees with the label matches the rate that formula predicts."""
    rows = read_jsonl(f"{WORLD}/preference/train.jsonl")
    diffs = np.array([gold_score(r["chosen"]) - gold_score(r["rejected"]) for r in rows])
    agree = np.mean(diffs > 0) + 0.5 * np.mean(diffs == 0)
    # E[agreement] = E[sigmoid(|d| / T)] over the pairs' absolute gold differences
    expected = np.mean([1 / (1 + math.exp(-abs(d) / make_world.LABEL_TEMPERATURE)) for d in diffs])
    assert 0.8 < agree < 0.95  # noisy, but mostly right
    assert abs(agree - expected) < 4 * math.sqrt(expected * (1 - expected) / len(rows)) + 0.005


def test_base_model_and_tokenizer_load_with_plain_transformers():
    tok = AutoTokenizer.from_pretrained(f"{WORLD}/base")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("Assistant:")
    cfg = AutoConfig.from_pretrained(f"{WORLD}/base")
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok)
    model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 1e7  # "a few million parameters"
    row = read_jsonl(f"{WORLD}/sft/test.jsonl")[0]
    ids = tok(row["prompt"] + row["completion"], return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok)


def test_make_world_is_deterministic(tmp_path):
    def build(out):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "data", "make_world.py"), "--out", str(out), "--scale", "0.02"],
            check=True,
            capture_output=True,
        )
        return {
            os.path.relpath(os.path.join(d, f), out): hashlib.md5(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(out)
            for f in fs
        }

    first, second = build(tmp_path / "a"), build(tmp_path / "b")
    assert first == second and len(first) >= 12
