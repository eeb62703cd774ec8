"""ppo.py: GAE, KL estimators, the EOS trick, the clipped losses, adaptive KL, end to end, learning."""

import json
import math
import os

import numpy as np
import pytest
import torch

import common
import ppo
from conftest import one_line_error, read_jsonl, run


def gae_loop(rewards, values, mask, gamma, lam):
    """GAE one number at a time, backwards, stopping at each response's last real token."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b][t] = running
    return torch.tensor(adv)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_a_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    mask = torch.zeros(5, 11)
    for b, n in enumerate([11, 7, 1, 4, 9]):
        mask[b, :n] = 1
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    want = gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages * mask, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(returns * mask, (want + values) * mask, rtol=1e-5, atol=1e-5)


def test_entropy_in_blocks_matches_the_definition(monkeypatch):
    """-sum p log p of softmax(logits / T), per position, in blocks of rows; its gradient through the recompute."""
    monkeypatch.setattr(common, "LOGITS_PER_BLOCK", 2 * 7 * 50)  # blocks of 2, 2, 1 rows
    torch.manual_seed(0)
    logits, weights = torch.randn(5, 7, 50, requires_grad=True), torch.randn(5, 7)
    for t in (1.0, 0.7):
        p = torch.softmax(logits.double() / t, -1)
        want = -(p * p.log()).sum(-1)
        (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
        got = ppo.entropy_from_logits(logits, t)
        (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
        torch.testing.assert_close(got, want.float())
        torch.testing.assert_close(got_grad, want_grad.float())
        with torch.no_grad():
            torch.testing.assert_close(ppo.entropy_from_logits(logits, t), want.float())
    uniform = torch.zeros(2, 3, 50)  # the maximum, log V
    torch.testing.assert_close(ppo.entropy_from_logits(uniform), torch.full((2, 3), math.log(50)))


def test_masked_statistics_match_numpy():
    torch.manual_seed(0)
    x, mask = torch.randn(4, 9), (torch.rand(4, 9) > 0.4).float()
    real = x[mask.bool()].numpy()
    assert ppo.masked_mean(x, mask).item() == pytest.approx(real.mean(), abs=1e-6)
    white = ppo.masked_whiten(x, mask)[mask.bool()].numpy()
    np.testing.assert_allclose(white, (real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8), rtol=1e-4, atol=1e-5)
    kept = ppo.masked_whiten(x, mask, shift_mean=False)[mask.bool()].numpy()
    np.testing.assert_allclose(kept, white + real.mean(), rtol=1e-4, atol=1e-5)
    # per-row means, as the losses use them
    np.testing.assert_allclose(
        ppo.masked_mean(x, mask, 1).numpy(), [x[i, mask[i].bool()].mean().item() for i in range(4)], rtol=1e-5
    )


def test_kl_estimators_match_their_definitions_and_the_true_kl():
    g = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(6, generator=g), torch.randn(6, generator=g)
    logp, logq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    true_kl = float((logp.exp() * (logp - logq)).sum())
    x = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)  # samples from the policy p
    k1 = ppo.kl_penalty(logp[x], logq[x], "k1")
    k3 = ppo.kl_penalty(logp[x], logq[x], "k3")
    torch.testing.assert_close(k1, logp[x] - logq[x])
    r = (logq[x] - logp[x]).exp()
    torch.testing.assert_close(k3, (r - 1) - r.log(), rtol=1e-5, atol=1e-6)
    assert (k3 >= 0).all()  # k3 is never negative; k1 can be
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.02)  # both are unbiased
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.02)


def test_eos_trick_and_shaped_rewards():
    EOS, PAD = 1, 0
    raw = torch.tensor([[5, 6, EOS, 7, 8], [5, 6, 7, 8, 9], [EOS, 3, 3, 3, 3]])
    responses, mask, has_eos = common.truncate_after_eos(raw, EOS, PAD)
    assert responses.tolist() == [[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]]
    logprobs, ref_logprobs = torch.full((3, 5), -1.0), torch.full((3, 5), -1.5)
    scores = torch.tensor([2.0, 3.0, -0.5])
    rewards, non_score, kl, final_scores = ppo.shaped_rewards(
        scores, has_eos, logprobs, ref_logprobs, mask.float(), kl_coef=0.1, missing_eos_score=-1.0
    )
    assert final_scores.tolist() == [2.0, -1.0, -0.5]  # no EOS: the fixed penalty score, not the model's 3.0
    torch.testing.assert_close(kl, 0.5 * mask.float())  # k1 = logp - logp_ref on real tokens only
    want = -0.1 * 0.5 * mask.float()
    want[0, 2] += 2.0  # the score sits on the last real token: the EOS
    want[1, 4] += -1.0
    want[2, 0] += -0.5
    torch.testing.assert_close(rewards, want)
    torch.testing.assert_close(non_score, -0.1 * 0.5 * mask.float())


def test_clipped_losses_against_hand_computed_values():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old_logp = torch.zeros(1, 4)
    new_logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 5.0]])  # ratios 1.5, 0.5, 1.1, (pad)
    adv = torch.tensor([[1.0, 1.0, -2.0, 9.0]])
    old_v, new_v, returns = (
        torch.zeros(1, 4),
        torch.tensor([[0.5, -0.1, 0.3, 7.0]]),
        torch.tensor([[1.0, 1.0, -1.0, 0.0]]),
    )
    pg, stats = ppo.policy_loss(new_logp, old_logp, adv, mask, 0.2)
    vf, vf_clipfrac = ppo.value_loss(new_v, old_v, returns, mask, 0.2)
    # token 1: max(-1 * 1.5, -1 * 1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: max(2.2, 2.2) = 2.2
    assert pg.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert stats["policy/clipfrac"].item() == pytest.approx(1 / 3)
    # values clipped to old +- 0.2: 0.2, -0.1, 0.2; loss 0.5 * mean(max(unclipped^2, clipped^2))
    want_vf = 0.5 * (max(0.5**2, 0.8**2) + max(1.1**2, 1.1**2) + max(1.3**2, 1.2**2)) / 3
    assert vf.item() == pytest.approx(want_vf)
    assert vf_clipfrac.item() == pytest.approx(1 / 3)  # token 1: the clipped value is further from the return
    assert stats["val/ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)


def test_adaptive_kl_controller():
    assert ppo.adaptive_kl_coef(0.1, 6.0, 3.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped at +20%
    assert ppo.adaptive_kl_coef(0.1, 2.7, 3.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, 3.0, 3.0, 100, 1000) == pytest.approx(0.1)


def test_ppo_end_to_end(sft_model, reward_model, tmp_path):
    out = tmp_path / "ppo"
    run(
        "ppo.py",
        "--model_name_or_path",
        sft_model,
        "--reward_model_name_or_path",
        reward_model,
        "--output_dir",
        out,
        "--max_steps",
        2,
        "--batch_size",
        8,
        "--micro_batch_size",
        4,
        "--num_mini_batches",
        2,
        "--response_length",
        12,
        "--num_eval_prompts",
        8,
        "--eval_every",
        1,
        "--log_samples_every",
        1,
        "--kl_estimator",
        "k3",
        "--adaptive_kl",
        "--whiten_rewards",
        "--entropy_coef",
        0.01,
    )
    results = json.load(open(out / "eval.json"))
    for key in ("gold_score", "gold_win_rate_vs_ref", "kl_to_ref", "eos_rate", "distinct_2", "mean_length", "rm_score"):
        assert key in results
    assert [r["step"] for r in read_jsonl(out / "curve.jsonl")] == [0, 1, 2]  # the SFT start, then each step
    assert os.path.exists(out / "value_model" / "model.safetensors")
    one_line_error(
        run(
            "ppo.py",
            "--model_name_or_path",
            sft_model,
            "--reward_model_name_or_path",
            sft_model,
            "--output_dir",
            tmp_path / "o",
            "--max_steps",
            1,
            ok=False,
        ),
        "not a LlamaForSequenceClassification",
    )


def test_ppo_raises_the_reward_model_and_gold_scores(online_runs):
    """16 updates of 32 episodes (conftest.online_runs) against the session's reward model."""
    out = online_runs["ppo"]
    start, end = read_jsonl(os.path.join(out, "curve.jsonl"))[0], json.load(open(os.path.join(out, "eval.json")))
    assert end["rm_score"] > start["rm_score"] + 0.6  # the proxy the policy optimises (seeds 0-3: +1.2 to +1.7)
    assert (
        end["gold_score"] > end["gold_score_ref"] + 0.2
    )  # and the truth, on the same held-out prompts (+0.36 to +0.42)
    assert end["gold_win_rate_vs_ref"] > 0.6
    assert 0 < end["kl_to_ref"] < 20 and end["eos_rate"] > 0.9
