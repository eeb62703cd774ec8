"""dpo.py: every loss variant against its formula, the precomputed reference, end to end, learning."""

import json
import math
import os

import pytest
import torch

import dpo
from conftest import one_line_error, run, world_subset


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def logps():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(8, generator=g) - 1 for _ in range(4))
    lc, lr = torch.randint(3, 30, (8,), generator=g).float(), torch.randint(3, 30, (8,), generator=g).float()
    return pc, pr, rc, rr, lc, lr


def formula(loss_type, pc, pr, rc, rr, lc, lr, beta, e=0.1, gamma=0.5):
    """The published losses, written out one pair at a time."""
    if loss_type in ("ipo", "simpo"):
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    if loss_type == "simpo":
        return -math.log(sig(beta * (pc - pr) - gamma))
    h = (pc - rc) - (pr - rr)
    return {
        "sigmoid": -math.log(sig(beta * h)),
        "cdpo": -(1 - e) * math.log(sig(beta * h)) - e * math.log(sig(-beta * h)),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - beta * h),
    }[loss_type]


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "ipo", "hinge", "simpo"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_each_loss_equals_its_formula(logps, loss_type, beta):
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        *logps, loss_type=loss_type, beta=beta, label_smoothing=0.1, simpo_gamma=0.5
    )
    want = [formula(loss_type, *(float(x[i]) for x in logps), beta) for i in range(8)]
    torch.testing.assert_close(losses, torch.tensor(want), rtol=1e-4, atol=1e-5)
    pc, pr, rc, rr, lc, lr = logps
    if loss_type in ("sigmoid", "cdpo", "hinge"):  # the implicit reward beta * log(pi / pi_ref)
        torch.testing.assert_close(chosen_rewards, beta * (pc - rc))
        torch.testing.assert_close(rejected_rewards, beta * (pr - rr))


def test_cdpo_without_smoothing_is_dpo(logps):
    a = dpo.dpo_loss(*logps, loss_type="cdpo", label_smoothing=0.0)[0]
    torch.testing.assert_close(a, dpo.dpo_loss(*logps, loss_type="sigmoid")[0])


def test_rpo_adds_the_chosen_nll(logps):
    pc, pr, rc, rr, lc, lr = logps
    base = dpo.dpo_loss(*logps, loss_type="sigmoid")[0]
    with_nll = dpo.dpo_loss(*logps, loss_type="sigmoid", rpo_alpha=0.5)[0]
    torch.testing.assert_close(with_nll - base, 0.5 * (-pc / lc))


def test_gradient_pushes_chosen_up_and_rejected_down(logps):
    pc, pr, rc, rr, lc, lr = logps
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    dpo.dpo_loss(pc, pr, rc, rr, lc, lr)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpo_raises_the_gold_score_over_the_sft_policy(preference_models):
    results = json.load(open(os.path.join(preference_models["dpo"], "eval.json")))
    for key in (
        "gold_score",
        "gold_win_rate_vs_ref",
        "kl_to_ref",
        "eos_rate",
        "distinct_2",
        "mean_length",
        "rewards/accuracies",
    ):
        assert key in results
    assert results["gold_win_rate_vs_ref"] > 0.6
    assert results["gold_score"] > results["gold_score_ref"] + 0.15
    assert results["kl_to_ref"] > 0
    assert results["rewards/accuracies"] > 0.6


@pytest.fixture(scope="module")
def small_prefs(tmp_path_factory):
    """64 training and 32 held-out pairs of the world, as a local dataset directory (quick mechanics tests)."""
    return world_subset(tmp_path_factory.mktemp("small_prefs"), "preference", 64, 32)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_dpo_variants_run_end_to_end(sft_model, small_prefs, tmp_path, loss_type):
    out = tmp_path / loss_type
    run(
        "dpo.py",
        "--model_name_or_path",
        sft_model,
        "--dataset_name",
        small_prefs,
        "--output_dir",
        out,
        "--loss_type",
        loss_type,
        "--max_steps",
        2,
        "--batch_size",
        8,
        "--num_eval_prompts",
        8,
        "--max_new_tokens",
        16,
        "--rpo_alpha",
        0.5,
        "--no_precompute_ref_logps",
    )
    assert "gold_win_rate_vs_ref" in json.load(open(out / "eval.json"))


def test_precomputed_and_live_reference_give_the_same_result(sft_model, small_prefs, tmp_path):
    common_args = [
        "--model_name_or_path",
        sft_model,
        "--dataset_name",
        small_prefs,
        "--max_steps",
        3,
        "--batch_size",
        8,
        "--num_eval_prompts",
        8,
        "--max_new_tokens",
        8,
        "--num_eval_rows",
        20,
    ]
    proc = run("dpo.py", *common_args, "--output_dir", tmp_path / "pre")
    # only what the run uses: 3 steps of 8 of the 64 pairs, 20 of the 32 held out (on a real model, minutes saved)
    assert "reference log-probs precomputed for 24 train and 20 eval pairs" in proc.stdout
    run("dpo.py", *common_args, "--output_dir", tmp_path / "live", "--no_precompute_ref_logps")
    pre, live = (json.load(open(tmp_path / d / "eval.json")) for d in ("pre", "live"))
    for k in ("loss", "rewards/chosen", "rewards/rejected", "gold_score"):
        assert pre[k] == pytest.approx(live[k], rel=1e-3, abs=1e-5), k


def test_dpo_bad_input(sft_model, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(
        run(
            "dpo.py",
            "--model_name_or_path",
            sft_model,
            "--dataset_name",
            tmp_path / "empty.jsonl",
            "--output_dir",
            tmp_path / "o",
            ok=False,
        ),
        "empty",
    )
    one_line_error(
        run(
            "dpo.py",
            "--model_name_or_path",
            sft_model,
            "--dataset_name",
            "data/world/sft",
            "--output_dir",
            tmp_path / "o",
            ok=False,
        ),
        "chosen",
    )
