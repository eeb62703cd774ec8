"""rlaif.py: the labeller's math (answer softmax, swap-and-average, principles), both modes end to end, learning."""

import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

import common
import rlaif
from conftest import WORLD, one_line_error, read_jsonl, run, write_jsonl


class StubJudge(torch.nn.Module):
    """A labeller whose answer logits come from a rule, and which records the questions it was asked."""

    def __init__(self, tok, rule):
        super().__init__()
        self.tok, self.rule, self.questions = tok, rule, []
        self.a, self.b = rlaif.answer_token_ids(tok)

    def forward(self, input_ids, attention_mask, **kwargs):
        logits = torch.zeros(len(input_ids), 1, len(self.tok))
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            text = self.tok.decode(ids[mask.bool()])
            self.questions.append(text)
            logits[i, 0, self.a], logits[i, 0, self.b] = self.rule(text)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tok():
    return common.load_tokenizer(f"{WORLD}/base")


def args_for(**kw):
    return SimpleNamespace(**{"preamble": rlaif.PREAMBLE, "judge_max_length": 512, "judge_batch_size": 4, **kw})


def label(judge, tok, firsts, seconds, principles=("Be kind.",), seed=0):
    prompts = [f"Opening {i}." for i in range(len(firsts))]
    return rlaif.label_pairs(
        judge,
        tok,
        prompts,
        firsts,
        seconds,
        list(principles),
        random.Random(seed),
        args_for(),
        "cpu",
        __import__("contextlib").nullcontext(),
    )


def test_answer_tokens_are_the_templated_A_and_B(tok):
    a, b = rlaif.answer_token_ids(tok)
    assert tok.convert_ids_to_tokens([a, b]) == ["ĠA", "ĠB"]  # what follows "Assistant:" in the chat template


def test_preference_is_the_softmax_over_the_two_answer_tokens(tok):
    judge = StubJudge(tok, lambda q: (2.0, 0.0))
    lp = rlaif.answer_logprobs(
        judge,
        [[5, 6, 7]],
        rlaif.answer_token_ids(tok),
        tok.pad_token_id,
        "cpu",
        4,
        __import__("contextlib").nullcontext(),
    )
    assert lp.exp()[0, 0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 1))
    assert lp.exp().sum().item() == pytest.approx(1.0)


def test_a_labeller_that_always_prefers_position_A_is_indifferent_after_debiasing(tok):
    judge = StubJudge(tok, lambda q: (4.0, 0.0))
    p, flipped, skipped = label(judge, tok, [" Good."] * 6, [" Bad."] * 6)
    torch.testing.assert_close(p, torch.full((6,), 0.5))
    assert flipped.all() and not skipped.any()  # its choice always follows the position
    metrics = rlaif.labeller_metrics(p, flipped, skipped)
    assert metrics["labeller_flip_rate"] == 1.0 and metrics["labeller_confidence"] == 0.5


def test_swap_and_average_keeps_a_consistent_preference(tok):
    # prefers whichever response says "Good": p(first better) from both orders
    def rule(q):
        return (3.0, 0.0) if q.split("Response A:")[1].split("\n")[0].strip() == "Good." else (0.0, 3.0)

    p, flipped, _ = label(StubJudge(tok, rule), tok, [" Good.", " Bad."], [" Bad.", " Good."])
    s = 1 / (1 + math.exp(-3))
    torch.testing.assert_close(p, torch.tensor([s, 1 - s]))
    assert not flipped.any()
    metrics = rlaif.labeller_metrics(p, flipped, torch.zeros(2, dtype=torch.bool), [1.0, 0.0])
    assert metrics["agreement"] == 1.0


def test_one_principle_per_comparison_the_same_in_both_orders(tok):
    principles = ["Prefer the kinder one.", "Prefer the shorter one.", "Prefer the funnier one."]
    judge = StubJudge(tok, lambda q: (0.0, 0.0))
    label(judge, tok, [" x."] * 40, [" y."] * 40, principles)
    asked = [next(p for p in principles if p in q) for q in judge.questions]
    assert all(sum(p in q for p in principles) == 1 for q in judge.questions)
    assert asked[:40] == asked[40:]  # questions 0-39 in order A/B, 40-79 the same pairs swapped
    assert set(asked) == set(principles)  # all are sampled over 40 comparisons


DIGITS = list(range(100, 109))  # the world's tokenizer writes most digits in two tokens: stand-in answer ids


class RatingJudge(torch.nn.Module):
    """A labeller that rates a response 7 when it says "Good." and 3 otherwise, almost surely."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.digits, self.questions = tok, DIGITS, []

    def forward(self, input_ids, attention_mask, **kwargs):
        logits = torch.zeros(len(input_ids), 1, len(self.tok))
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            self.questions.append(self.tok.decode(ids[mask.bool()]))
            logits[i, 0, self.digits[6 if "Response: Good." in self.questions[-1] else 2]] = 30.0
        return SimpleNamespace(logits=logits)


def test_direct_mode_rates_each_response_alone(tok, monkeypatch):
    """d-RLAIF: rating = expected digit under the softmax over 1-9; p(first better) = sigmoid(rating difference).
    (On SmolLM2, whose digits are single tokens: the real-model tier.)"""
    monkeypatch.setattr(rlaif, "answer_token_ids", lambda tok, answers: DIGITS)
    judge = RatingJudge(tok)
    prompts = [f"Opening {i}." for i in range(3)]
    p, flipped, skipped = rlaif.rate_pairs(
        judge, tok, prompts, [" Good.", " Bad.", " Good."], [" Bad.", " Good.", " Good."], ["Be kind."],
        random.Random(0), args_for(preamble=None), "cpu", __import__("contextlib").nullcontext(),
    )  # fmt: skip
    s = 1 / (1 + math.exp(-4))  # ratings 7 and 3
    torch.testing.assert_close(p, torch.tensor([s, 1 - s, 0.5]), atol=1e-6, rtol=0)
    assert not flipped.any() and not skipped.any()
    assert len(judge.questions) == 6  # one question per response, not two per pair
    q = judge.questions[0]
    expected = f"{rlaif.DIRECT_PREAMBLE}\n\nPrompt: Opening 0.\nResponse: Good.\n\nBe kind. Answer with one digit."
    assert expected in q  # through the world's chat template
    uniform = torch.zeros(1, 9).log_softmax(-1)  # a labeller with no opinion rates 5
    assert (uniform.exp() * torch.arange(1, 10)).sum().item() == pytest.approx(5.0)


def test_online_losses_match_dpo_py_sigmoid_and_length_normalised_ipo():
    """rlaif.py's online step uses the same DPO and IPO as dpo.py: IPO on per-token average log-probs."""
    import dpo

    g = torch.Generator().manual_seed(0)
    logps, ref_logps = -20 * torch.rand(8, generator=g), -20 * torch.rand(8, generator=g)
    lengths = torch.tensor([3, 9, 4, 12, 7, 2, 15, 5])
    for loss_type in ("sigmoid", "ipo"):
        ours, h = rlaif.dpo_losses(logps, ref_logps, lengths, 4, loss_type, 0.1)
        theirs, chosen_rewards, rejected_rewards = dpo.dpo_loss(
            logps[:4], logps[4:], ref_logps[:4], ref_logps[4:], lengths[:4], lengths[4:], loss_type, 0.1
        )
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(0.1 * h, chosen_rewards - rejected_rewards)
    ipo_sum = ((logps[:4] - ref_logps[:4]) - (logps[4:] - ref_logps[4:]) - 5) ** 2  # summed log-probs: another loss
    assert not torch.allclose(rlaif.dpo_losses(logps, ref_logps, lengths, 4, "ipo", 0.1)[0], ipo_sum)


def test_constitution_from_text_or_json(tmp_path):
    (tmp_path / "c.txt").write_text("Be helpful.\n\nBe honest.\n")
    (tmp_path / "c.json").write_text(json.dumps(["Be harmless."]))
    assert rlaif.load_constitution(str(tmp_path / "c.txt"), "--constitution") == ["Be helpful.", "Be honest."]
    assert rlaif.load_constitution(str(tmp_path / "c.json"), "--constitution") == ["Be harmless."]
    rating = rlaif.load_constitution(rlaif.Args.rating_constitution, "--rating_constitution")
    assert len(rating) == 4 and all("from 1" in p and "to 9" in p for p in rating)  # questions with their scale
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemExit, match="no principles"):
        rlaif.load_constitution(str(tmp_path / "empty.txt"), "--constitution")
    for name, text in (("object.json", '{"a": "Be kind."}'), ("string.json", '"Be kind."')):
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match="no principles"):
            rlaif.load_constitution(str(tmp_path / name), "--constitution")
    (tmp_path / "broken.json").write_text('["Be kind.",')
    with pytest.raises(SystemExit, match="not valid JSON"):
        rlaif.load_constitution(str(tmp_path / "broken.json"), "--constitution")
    (tmp_path / "latin1.txt").write_bytes("Be caf\xe9.".encode("latin-1"))
    with pytest.raises(SystemExit, match="not UTF-8"):
        rlaif.load_constitution(str(tmp_path / "latin1.txt"), "--constitution")


def test_the_labeller_reads_chat_messages_as_text():
    """Plain text as is; a chat prompt without its system message (the policy's instruction, not the
    labeller's), one turn as its content, several as "role: content" lines."""
    assert common.plain_text(" Plain.") == " Plain."
    system = {"role": "system", "content": "Continue the review."}
    assert common.plain_text([system, {"role": "user", "content": "I saw it."}]) == "I saw it."
    assert common.plain_text([{"role": "assistant", "content": "Loved it."}]) == "Loved it."
    turns = [system, {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    assert common.plain_text(turns) == "user: Hi.\nassistant: Hello."


def test_world_judge_data_asks_rlaif_questions():
    """The offline labeller is trained on exactly the questions rlaif.py asks, under the world's constitution."""
    row = read_jsonl(f"{WORLD}/judge/train.jsonl")[0]
    q = row["prompt"][0]["content"]
    principle = next(p for p in rlaif.load_constitution(rlaif.Args.constitution, "--constitution") if p in q)
    prompt, rest = q.split("\nPrompt: ", 1)[1].split("\nResponse A:", 1)
    a, b = rest.removesuffix("\nWhich response is better? Answer A or B.").split("\nResponse B:")
    assert q == rlaif.judge_query(rlaif.PREAMBLE, principle, prompt, a, b)
    assert row["completion"][0]["content"] in ("A", "B")


def test_label_mode_writes_a_dataset_reward_and_dpo_accept(sft_model, tmp_path):
    """Distilled RLAIF: label given pairs, then train a reward model on the soft labels (any causal LM can
    act as the labeller for this plumbing test)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", read_jsonl(f"{WORLD}/preference/train.jsonl")[:60])
    out = tmp_path / "labels"
    run(
        "rlaif.py",
        "--mode",
        "label",
        "--model_name_or_path",
        sft_model,
        "--judge_model_name_or_path",
        sft_model,
        "--dataset_name",
        pairs,
        "--output_dir",
        out,
    )
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) > 40 and all(0.5 <= r["label"] <= 1 for r in rows)
    info = json.load(open(out / "labelling.json"))
    for key in (
        "train_gold_agreement",
        "train_label_agreement",
        "train_labeller_flip_rate",
        "train_labeller_confidence",
    ):
        assert key in info
    run(
        "reward.py",
        "--model_name_or_path",
        sft_model,
        "--dataset_name",
        out,
        "--label_column",
        "label",
        "--max_steps",
        2,
        "--batch_size",
        16,
        "--micro_batch_size",
        16,
        "--num_normalisation_rows",
        32,
        "--output_dir",
        tmp_path / "rm",
    )
    run(
        "dpo.py",
        "--model_name_or_path",
        sft_model,
        "--dataset_name",
        out,
        "--max_steps",
        2,
        "--batch_size",
        8,
        "--num_eval_prompts",
        4,
        "--max_new_tokens",
        8,
        "--output_dir",
        tmp_path / "dpo",
    )


def test_label_mode_samples_pairs_for_prompts(sft_model, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", read_jsonl(f"{WORLD}/prompts/train.jsonl")[:24])
    constitution = tmp_path / "c.txt"
    constitution.write_text("Choose the response that is more positive about the film.\n")
    out = tmp_path / "labels"
    run(
        "rlaif.py",
        "--mode",
        "label",
        "--model_name_or_path",
        sft_model,
        "--judge_model_name_or_path",
        sft_model,
        "--dataset_name",
        prompts,
        "--constitution",
        constitution,
        "--response_length",
        16,
        "--output_dir",
        out,
    )
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl")
    assert len(rows) == 24 and all(r["chosen"] != r["rejected"] or r["label"] == 0.5 for r in rows)


def test_online_mode_end_to_end(sft_model, tmp_path):
    out = tmp_path / "online"
    run(
        "rlaif.py",
        "--model_name_or_path",
        sft_model,
        "--judge_model_name_or_path",
        sft_model,
        "--output_dir",
        out,
        "--max_steps",
        2,
        "--batch_size",
        8,
        "--micro_batch_size",
        4,
        "--response_length",
        16,
        "--max_new_tokens",
        16,
        "--num_eval_prompts",
        8,
        "--eval_every",
        1,
        "--loss_type",
        "ipo",
    )
    results = json.load(open(out / "eval.json"))
    for key in (
        "gold_score",
        "gold_win_rate_vs_ref",
        "kl_to_ref",
        "eos_rate",
        "distinct_2",
        "mean_length",
        "labeller_gold_agreement",
        "labeller_flip_rate",
        "labeller_confidence",
    ):
        assert key in results


def test_the_world_labeller_agrees_with_the_gold_rater_on_held_out_pairs(tmp_path):
    """The committed offline labeller (data/world/judge_model) orders at least 75% of the 1,000 held-out
    preference pairs as the gold rater does: data/world/judge, which it learned from, shares no prompt with
    them. Scoring is deterministic (no sampling), so this is a fixed figure (0.790 when committed)."""
    out = tmp_path / "labels"
    run(
        "rlaif.py",
        "--mode",
        "label",
        "--dataset_name",
        f"{WORLD}/preference",
        "--max_label_rows",
        1000,
        "--output_dir",
        out,
    )
    info = json.load(open(out / "labelling.json"))
    assert info["test_labeller_skip_rate"] == 0
    assert info["test_gold_agreement"] >= 0.75


def test_online_rlaif_raises_the_gold_score_over_the_sft_policy(online_runs):
    """OAIF with the world's own labeller (data/world/judge_model; conftest.online_runs): its fresh,
    AI-labelled pairs move the policy towards what the gold rater prefers, though no human label is used."""
    results = json.load(open(os.path.join(online_runs["rlaif"], "eval.json")))
    assert results["labeller_gold_agreement"] > 0.6
    assert results["gold_score"] > results["gold_score_ref"] + 0.2  # seeds 0-3: +0.31 to +0.46
    assert results["gold_win_rate_vs_ref"] > 0.6


def test_direct_mode_needs_a_labeller_that_writes_digits_in_one_token(tmp_path):
    """The world's labeller writes " 2" as two tokens: --judge_mode direct cannot read its rating, and says so."""

    proc = run("rlaif.py", "--judge_mode", "direct", "--output_dir", tmp_path / "o", ok=False)
    one_line_error(proc, "does not tell the answers", "first token")
    assert not os.path.exists(tmp_path / "o")
