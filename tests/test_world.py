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
from data import annotators, make_world
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
    for name in ("sft", "preference", "prompts", "judge", "ranking"):
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


def test_rankings_are_noisy_at_the_documented_rate():
    """Rankings of 4 responses from Plackett-Luce on the gold rating: any two of a ranking are ordered as Bradley-Terry
    orders a pair, sigmoid((gold(a) - gold(b)) / T), so the gold rater agrees with the observed share predicted."""
    rows = read_jsonl(f"{WORLD}/ranking/train.jsonl")
    assert all(len(r["responses"]) == make_world.RANKING_K for r in rows)
    diffs = np.array([gold_score(r["responses"][i]) - gold_score(r["responses"][j])
                      for r in rows for i in range(4) for j in range(i + 1, 4)])  # fmt: skip
    agree = np.mean(diffs > 0) + 0.5 * np.mean(diffs == 0)
    expected = np.mean([1 / (1 + math.exp(-abs(d) / annotators.LABEL_TEMPERATURE)) for d in diffs])
    assert 0.8 < agree < 0.95
    # pairs of one ranking are not independent: a loose bound, 4 standard errors of the rankings' count
    assert abs(agree - expected) < 4 * math.sqrt(expected * (1 - expected) / len(rows)) + 0.005


def test_ratings_and_thumbs_judge_the_preference_pairs_responses_through_the_same_noise():
    """ratings/ and binary/ hold each preference pair's two responses, chosen then rejected. An annotator's utility is
    u = gold + T (g - Euler's gamma), g a standard Gumbel draw; a rating is round(4 + 3u) clipped to 1-7, thumbs up
    when u > THUMBS_THRESHOLD: the observed shares match those the formula predicts, response by response."""
    T, gamma = annotators.LABEL_TEMPERATURE, annotators.EULER_GAMMA

    def p_above(x, gold):  # P(u > x) = P(Gumbel > (x - gold) / T + gamma), for each gold rating
        return 1 - np.exp(-np.exp(-((x - gold) / T + gamma)))

    for split in ("train", "test"):
        pairs = read_jsonl(f"{WORLD}/preference/{split}.jsonl")
        ratings, thumbs = (read_jsonl(f"{WORLD}/{name}/{split}.jsonl") for name in ("ratings", "binary"))
        expected = [(p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")]
        assert [(r["prompt"], r["completion"]) for r in ratings] == expected
        assert [(r["prompt"], r["completion"]) for r in thumbs] == expected
    gold = np.array([gold_score(r["completion"]) for r in thumbs])  # the train split's
    up = np.array([r["label"] for r in thumbs])
    assert up.dtype == bool and 0.45 < up.mean() < 0.55  # about half up
    want = p_above(annotators.THUMBS_THRESHOLD, gold)
    assert abs(up.mean() - want.mean()) < 4 * math.sqrt(want.mean() * (1 - want.mean()) / len(up))
    ratings = np.array([r["rating"] for r in ratings])
    assert set(ratings) == set(range(1, 8))
    for k in range(1, 8):  # P(rating = k) = P(u > (k - 4.5) / 3) - P(u > (k - 3.5) / 3), the ends open
        high = p_above((k - 4.5) / 3, gold) if k > 1 else 1.0
        low = p_above((k - 3.5) / 3, gold) if k < 7 else 0.0
        p = (high - low).mean()
        assert abs((ratings == k).mean() - p) < 4 * math.sqrt(p * (1 - p) / len(ratings)), k
    # about half of the demonstrations get a thumbs up, as the threshold was chosen
    demos = read_jsonl(f"{WORLD}/sft/train.jsonl")
    rows = annotators.label_responses([d["prompt"] for d in demos], [d["completion"] for d in demos], seed=3)
    assert 0.48 < np.mean([r["label"] for r in rows]) < 0.55


def test_annotators_label_any_responses():
    """The simulated annotator behind the world's labels, for a policy's own samples: reproducible by seed, and
    following the gold rater where it is clear."""
    good, bad, spam = (
        " I loved it. The acting is brilliant.",
        " I hated it. The plot is awful.",
        " Great great great great.",
    )
    rows = annotators.label_pairs(["p"] * 200, [good] * 100 + [bad] * 100, [bad] * 100 + [good] * 100, seed=1)
    assert rows == annotators.label_pairs(["p"] * 200, [good] * 100 + [bad] * 100, [bad] * 100 + [good] * 100, seed=1)
    assert sum(r["chosen"] == good for r in rows) > 190
    ranked = annotators.rank_responses(["p"] * 50, [[spam, bad, good]] * 50, seed=2)
    assert all(sorted(r["responses"]) == sorted([spam, bad, good]) for r in ranked)
    assert sum(r["responses"][0] == good for r in ranked) > 45
    rated = annotators.rate_responses(["p"] * 150, [good, bad, spam] * 50, seed=3)
    assert rated == annotators.rate_responses(["p"] * 150, [good, bad, spam] * 50, seed=3)
    mean_rating = [np.mean([r["rating"] for r in rated[i::3]]) for i in range(3)]  # gold 0.83, -0.80, -0.38
    assert mean_rating[0] > 6 and mean_rating[1] < 2.5 and 2.5 < mean_rating[2] < 3.5
    thumbs = annotators.label_responses(["p"] * 100, [good, bad] * 50, seed=4)
    assert sum(r["label"] for r in thumbs[0::2]) >= 48 and sum(r["label"] for r in thumbs[1::2]) <= 2


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
    assert first == second and len(first) >= 16
