"""rloo.py: the leave-one-out and group-normalised advantages, k3, REINFORCE at one epoch, end to end, learning."""

import json
import math
import os

import pytest
import torch

import rloo
from conftest import one_line_error, read_jsonl, run


@pytest.mark.parametrize(
    "rewards,want",
    [
        ([[1.0, 3.0]], [[-2.0, 2.0]]),  # k = 2: the other response is the baseline
        ([[1.0, 2.0, 3.0, 6.0]], [[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]]),  # k = 4
        ([[2.0, 2.0, 5.0, 5.0]], [[2 - 4.0, 2 - 4.0, 5 - 3.0, 5 - 3.0]]),  # ties
        ([[3.0, 3.0, 3.0, 3.0], [0.5, -0.5, 0.5, -0.5]], [[0.0] * 4, [2 / 3, -2 / 3, 2 / 3, -2 / 3]]),
    ],
)
def test_rloo_advantages_against_hand_computed_values(rewards, want):
    advantages = rloo.rloo_advantages(torch.tensor(rewards))
    torch.testing.assert_close(advantages, torch.tensor(want))
    # A_i = k / (k - 1) (r_i - mean): a group's advantages sum to 0
    torch.testing.assert_close(advantages.sum(1), torch.zeros(len(rewards)))


@pytest.mark.parametrize(
    "scores,std",
    [
        ([[1.0, 3.0]], math.sqrt(2)),  # mean 2, sample std sqrt(((1 - 2)^2 + (3 - 2)^2) / 1)
        ([[1.0, 2.0, 3.0, 6.0]], math.sqrt(14 / 3)),  # mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3)
        ([[2.0, 2.0, 5.0, 5.0]], math.sqrt(9 / 3)),  # ties: mean 3.5, sample std sqrt(4 * 2.25 / 3)
    ],
)
def test_grpo_advantages_against_hand_computed_values(scores, std):
    s = torch.tensor(scores)
    want = (s - s.mean()) / (std + 1e-4)
    torch.testing.assert_close(rloo.grpo_advantages(s, eps=1e-4), want)


def test_a_group_of_equal_scores_gets_zero_advantage_not_a_division_by_zero():
    for k in (2, 4):
        equal = torch.full((3, k), 0.7)
        assert torch.equal(rloo.grpo_advantages(equal, eps=1e-4), torch.zeros(3, k))
        assert torch.equal(rloo.rloo_advantages(equal), torch.zeros(3, k))


def test_k3_is_the_unbiased_non_negative_kl_estimator():
    g = torch.Generator().manual_seed(0)
    logp, logq = torch.randn(6, generator=g).log_softmax(-1), torch.randn(6, generator=g).log_softmax(-1)
    x = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)  # samples from pi
    k3 = rloo.kl_k3(logp[x], logq[x])
    q = (logq[x] - logp[x]).exp()
    torch.testing.assert_close(k3, (q - 1) - q.log(), rtol=1e-5, atol=1e-6)
    assert (k3 >= 0).all()
    assert k3.mean().item() == pytest.approx(float((logp.exp() * (logp - logq)).sum()), abs=0.02)


def test_one_epoch_is_reinforce_with_the_baseline():
    """At the rollout's own weights the ratio is 1: the loss's gradient is -A_i per real token, over the tokens."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages = torch.tensor([0.5, -2.0])
    new = old.clone().requires_grad_()
    loss, clipfrac, approxkl = rloo.policy_loss(new, old, advantages, mask, cliprange=0.2)
    loss.backward()
    torch.testing.assert_close(new.grad, -advantages[:, None] * mask / mask.sum())
    assert loss.item() == pytest.approx(-(0.5 * 3 - 2.0 * 2) / 5) and clipfrac.item() == 0 and approxkl.item() == 0
    # away from it, the ratio is clipped as PPO's: a positive advantage stops pulling past 1 + cliprange
    far = (old + math.log(1.5)).requires_grad_()
    rloo.policy_loss(far, old, advantages, mask, cliprange=0.2)[0].backward()
    assert (far.grad[0] == 0).all() and (far.grad[1, :2] != 0).all()


@pytest.mark.parametrize("baseline", ["rloo", "grpo"])
def test_rloo_end_to_end(sft_model, reward_model, tmp_path, baseline):
    out = tmp_path / baseline
    run("rloo.py", "--model_name_or_path", sft_model, "--reward_model_name_or_path", reward_model, "--output_dir", out,
        "--baseline", baseline, "--max_steps", 2, "--batch_size", 4, "--rloo_k", 3, "--micro_batch_size", 2,
        "--num_mini_batches", 2, "--response_length", 12, "--max_new_tokens", 12, "--num_eval_prompts", 8,
        "--eval_every", 1, "--log_every", 1, "--log_samples_every", 1)  # fmt: skip
    results = json.load(open(out / "eval.json"))
    for key in ("gold_score", "gold_win_rate_vs_ref", "kl_to_ref", "eos_rate", "distinct_2", "rm_score"):
        assert key in results
    assert (results["episodes"], results["responses"]) == (8, 24)
    assert [r["step"] for r in read_jsonl(out / "curve.jsonl")] == [0, 1, 2]
    assert not os.path.exists(out / "value_model")  # critic-free
    logged = read_jsonl(out / "metrics.jsonl")
    assert all(r["loss/kl"] >= 0 for r in logged if "loss/kl" in r)


def test_rloo_mistakes_are_one_line(sft_model, reward_model, tmp_path):
    base = [
        "--model_name_or_path",
        sft_model,
        "--reward_model_name_or_path",
        reward_model,
        "--output_dir",
        tmp_path / "o",
    ]
    one_line_error(run("rloo.py", *base, "--rloo_k", 1, ok=False), "--rloo_k must be at least 2")
    one_line_error(run("rloo.py", *base, "--batch_size", 3, "--micro_batch_size", 4, ok=False), "must split into")
    assert not os.path.exists(tmp_path / "o")


def test_rloo_raises_the_reward_model_and_gold_scores(online_runs):
    """RLOO (conftest.online_runs) against the session's reward model: the proxy and the truth both rise."""
    out = online_runs["rloo"]
    start, end = read_jsonl(os.path.join(out, "curve.jsonl"))[0], json.load(open(os.path.join(out, "eval.json")))
    assert end["rm_score"] > start["rm_score"] + 0.6  # the proxy the policy optimises (seeds 0-3: +0.91 to +1.21)
    assert end["gold_score"] > end["gold_score_ref"] + 0.2  # and the truth, on the same prompts (+0.34 to +0.51)
    assert end["gold_win_rate_vs_ref"] > 0.6  # (0.66 to 0.79)
    assert 0 < end["kl_to_ref"] < 20 and end["eos_rate"] > 0.9
