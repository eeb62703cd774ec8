"""Every form of feedback: the rating and thumbs losses of reward.py and KTO (kto.py) against their formulas, each
trainer end to end on the world's ratings and thumbs, a user's mistakes in the label columns, learning, and
corrections trained as demonstrations and as pairs."""

import contextlib
import io
import json
import math
import os
import re
import runpy
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import kto
import reward
from conftest import ENV, ROOT, WORLD, read_jsonl, run, run_side_by_side, world_subset, write_jsonl
from data.gold import gold_score


def sig(x):
    return 1 / (1 + math.exp(-x))


# ---- reward.py: thumbs and ratings ----------------------------------------------------------------------
def test_thumbs_loss_is_a_logistic_classifier_on_the_reward():
    """-log sigmoid(r) for a thumbs up, -log sigmoid(-r) for a thumbs down, by hand."""
    losses = reward.thumbs_loss(torch.tensor([2.0, -1.0, 0.0, 3.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    want = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(3))]
    torch.testing.assert_close(losses, torch.tensor(want))
    torch.testing.assert_close(losses[:2], torch.tensor([0.126928, 0.313262]), atol=1e-6, rtol=0)


def test_rating_regression_is_the_squared_error_to_the_centred_rating():
    losses = reward.rating_loss(torch.tensor([1.0, -0.5, 0.0]), torch.tensor([6.0, 2.0, 4.5]), 4.5, (1, 7))
    torch.testing.assert_close(losses, torch.tensor([0.25, 4.0, 0.0]))


def test_ordinal_rating_loss_is_the_cumulative_logit_likelihood():
    """-log P(rating | r) against P(rating = k) = sigmoid(c_k - r) - sigmoid(c_{k-1} - r), c_k = k + 1/2 - mean,
    c_0 = -inf and c_7 = inf, written out; the seven probabilities sum to 1."""
    mean = 4.2
    cut = {k: (k + 0.5 - mean if 1 <= k <= 6 else (math.inf if k > 6 else -math.inf)) for k in range(0, 8)}

    def probability(k, r):
        return sig(cut[k] - r) - sig(cut[k - 1] - r)

    for r in (-3.0, -0.4, 0.0, 1.3, 5.0):
        assert sum(probability(k, r) for k in range(1, 8)) == pytest.approx(1.0)
        ratings = torch.arange(1.0, 8.0)
        losses = reward.rating_loss(torch.full((7,), r), ratings, mean, (1, 7), "ordinal")
        want = torch.tensor([-math.log(probability(k, r)) for k in range(1, 8)])
        torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
    # far from its bin a response's loss stays finite (computed in logs)
    assert torch.isfinite(reward.rating_loss(torch.tensor([200.0]), torch.tensor([3.0]), mean, (1, 7), "ordinal"))


# ---- kto.py: the loss, z0 and the mismatched pairs ---------------------------------------------------------
def kto_formula(logps, ref_logps, labels, mismatched_logps, mismatched_ref_logps, beta, w_d, w_u):
    """Ethayarajh et al. 2024, eq. 7, one row at a time: z0 = max(0, mean KL estimate of the mismatched pairs)."""
    kl = [a - b for a, b in zip(mismatched_logps, mismatched_ref_logps, strict=True)]
    z0 = max(0.0, sum(kl) / len(kl))
    out = []
    for lp, ref, desirable in zip(logps, ref_logps, labels, strict=True):
        r = lp - ref
        out.append(w_d * (1 - sig(beta * (r - z0))) if desirable else w_u * (1 - sig(beta * (z0 - r))))
    return out, z0


@pytest.mark.parametrize("beta, w_d, w_u", [(0.1, 1.0, 1.0), (0.5, 5.0, 1.0), (2.0, 1.0, 1.33)])
@pytest.mark.parametrize("shift", [-3.0, 4.0])  # a negative KL estimate is clamped to 0; a positive one is z0
def test_kto_loss_and_z0_equal_the_formula(beta, w_d, w_u, shift):
    g = torch.Generator().manual_seed(0)
    logps, ref_logps = -30 * torch.rand(8, generator=g), -30 * torch.rand(8, generator=g)
    mismatched_ref = -40 * torch.rand(8, generator=g)
    mismatched_logps = mismatched_ref + shift + torch.randn(8, generator=g)
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    want, want_z0 = kto_formula(
        logps.tolist(), ref_logps.tolist(), labels.tolist(), mismatched_logps.tolist(), mismatched_ref.tolist(), beta,
        w_d, w_u,
    )  # fmt: skip
    z0 = kto.reference_point(mismatched_logps - mismatched_ref, 8)
    assert float(z0) == pytest.approx(want_z0, abs=1e-5) and (want_z0 == 0) == (shift < 0)
    losses, rewards = kto.kto_loss(logps, ref_logps, labels, z0, beta, w_d, w_u)
    torch.testing.assert_close(losses, torch.tensor(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rewards, beta * (logps - ref_logps))


def test_kto_gradient_lifts_desirable_and_lowers_undesirable_but_not_through_z0():
    logps = torch.tensor([-10.0, -10.0], requires_grad=True)
    ratios = torch.tensor([1.0, 3.0], requires_grad=True)  # mismatched pairs' log-ratios: z0 = 2
    z0 = kto.reference_point(ratios, 2)
    losses, _ = kto.kto_loss(logps, torch.tensor([-11.0, -11.0]), torch.tensor([True, False]), z0)
    losses.sum().backward()
    assert logps.grad[0] < 0 < logps.grad[1]  # descending the loss raises the desirable log-prob, lowers the other
    assert ratios.grad is None  # z0 is a constant of the step


def test_mismatched_pairs_each_prompt_with_the_next_rows_completion():
    rows = [kto.common.Unpaired(f"p{i}", f"c{i}", 1.0, i) for i in range(4)]
    assert kto.mismatched(rows, range(4)) == (["p0", "p1", "p2", "p3"], ["c1", "c2", "c3", "c0"])
    assert kto.mismatched(rows, [2, 3]) == (["p2", "p3"], ["c3", "c0"])  # a rank's share: the same pairs


def test_kto_metrics_average_each_label_apart():
    losses, rewards = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 1.5])
    sums = kto.row_stats(losses, rewards, torch.tensor([True, False, True])).sum(0)
    metrics = kto.kto_metrics(sums, 3, torch.tensor(0.25))
    assert metrics == pytest.approx(
        {"loss": 2.0, "rewards/desirable": 1.0, "rewards/undesirable": -1.0, "rewards/margins": 2.0, "kl": 0.25}
    )
    only_up = kto.kto_metrics(kto.row_stats(losses, rewards, torch.ones(3, dtype=torch.bool)).sum(0), 3, 0.0)
    assert "rewards/undesirable" not in only_up and "rewards/margins" not in only_up


# ---- end to end, and a user's mistakes ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_direct(tmp_path_factory):
    """64 training and 16 held-out rows of the world's ratings and of its thumbs, and 16 held-out pairs."""
    out = tmp_path_factory.mktemp("direct")
    subsets = {name: world_subset(out / name, name, 64, 16) for name in ("ratings", "binary")}
    return {**subsets, "pairs": world_subset(out / "pairs", "preference", 8, 16)}


QUICK = ["--max_steps", 2, "--batch_size", 8, "--micro_batch_size", 4]


@pytest.mark.parametrize("data, options", [("ratings", []), ("ratings", ["--rating_loss", "ordinal"]), ("binary", [])])
def test_reward_model_from_ratings_and_thumbs_end_to_end(sft_model, small_direct, tmp_path, data, options):
    out = tmp_path / "rm"
    args = ["--model_name_or_path", sft_model, "--dataset_name", small_direct[data], "--output_dir", out, *QUICK]
    run("reward.py", *args, "--num_normalisation_rows", 32, "--eval_dataset_name", small_direct["pairs"], *options)
    results = json.load(open(out / "eval.json"))
    assert {"rewards/accuracies", "gold_agreement"} <= set(results)  # on held-out pairs, as a model from pairs
    assert abs(results["reward_mean_after_normalisation"]) < 1e-3
    assert {"train/loss", "train/grad_norm"} <= set(read_jsonl(out / "metrics.jsonl")[-2])


def test_kto_end_to_end(sft_model, small_direct, tmp_path):
    out = tmp_path / "kto"
    proc = run("kto.py", "--model_name_or_path", sft_model, "--dataset_name", small_direct["binary"], "--output_dir",
               out, *QUICK, "--num_eval_prompts", 8, "--max_new_tokens", 16, "--num_eval_rows", 10)  # fmt: skip
    # two steps of 8 rows, 16 mismatched pairs, 10 held-out rows: only what the run uses
    assert "reference log-probs precomputed for 16 train rows, 16 mismatched pairs and 10 eval rows" in proc.stdout
    results = json.load(open(out / "eval.json"))
    for key in ("gold_win_rate_vs_ref", "kl_to_ref", "eos_rate", "distinct_2", "loss", "kl", "rewards/desirable"):
        assert key in results, key
    logged = read_jsonl(out / "metrics.jsonl")[0]
    assert logged["step"] == 2 and {"train/loss", "rewards/undesirable", "kl"} <= set(logged)
    assert len(read_jsonl(out / "samples.jsonl")) == 8
    AutoModelForCausalLM.from_pretrained(out)


def test_kto_killed_and_resumed_ends_with_the_same_weights(sft_model, small_direct, tmp_path):
    """The steps' batches are drawn again from the seed, not stored: the resumed run takes the same steps."""
    args = ["--model_name_or_path", sft_model, "--dataset_name", small_direct["binary"], "--max_steps", 6]
    args += ["--batch_size", 8, "--num_eval_prompts", 4, "--max_new_tokens", 4, "--save_every", 2, "--log_every", 1]
    run("kto.py", *args, "--output_dir", tmp_path / "straight")
    argv = [sys.executable, os.path.join(ROOT, "kto.py"), *map(str, args), "--output_dir", str(tmp_path / "killed")]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "checkpoint" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert state.exists() and not (tmp_path / "killed" / "model.safetensors").exists(), "not killed in the middle"
    run("kto.py", *args, "--output_dir", tmp_path / "killed", "--resume")
    straight, killed = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "killed"))
    assert all(torch.equal(straight[k], killed[k]) for k in straight)  # bit for bit, on CPU
    curves = [[{k: v for k, v in r.items() if "seconds" not in k} for r in read_jsonl(tmp_path / d / "metrics.jsonl")]
              for d in ("straight", "killed")]  # fmt: skip
    assert curves[0] == curves[1] and len(curves[0]) > 6


def test_label_column_mistakes_are_one_line(sft_model, tmp_path):
    ratings = read_jsonl(f"{WORLD}/ratings/train.jsonl")[:40]
    thumbs = read_jsonl(f"{WORLD}/binary/train.jsonl")[:40]

    def fails(script, rows, *args):
        """The one error line of `script` on rows (a list) or a dataset (a path), nothing written; run in this process
        (runpy), as a user would from the command line but without starting Python again."""
        data = write_jsonl(tmp_path / "data.jsonl", rows) if isinstance(rows, list) else rows
        args = ["--model_name_or_path", sft_model, "--dataset_name", data, "--output_dir", tmp_path / "o", *args]
        argv, sys.argv = sys.argv, [script, *map(str, args)]
        try:
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        finally:
            sys.argv = argv
        line = str(exit_info.value.code)
        assert line.startswith("error: ") and "\n" not in line, line
        assert not os.path.exists(tmp_path / "o")
        return line

    for bad, words in (
        (8, "'rating' must hold a whole-number rating from 1 to 7, not 8"),
        (4.5, "not 4.5"),
        ("5", "not '5'"),
    ):
        assert words in fails("reward.py", ratings[:7] + [{**ratings[7], "rating": bad}] + ratings[8:])
    other_scale = ratings[:7] + [{**ratings[7], "rating": 11}] + ratings[8:]
    assert "from 0 to 10, not 11" in fails("reward.py", other_scale, "--rating_scale", 0, 10)
    assert "'label' must hold a boolean" in fails("reward.py", thumbs[:5] + [{**thumbs[5], "label": "yes"}])
    assert "'label' must hold a boolean (true for a thumbs up, false for down), not 1" in fails(
        "kto.py", thumbs[:5] + [{**thumbs[5], "label": 1}] + thumbs[6:]
    )
    assert "for pairs, not thumbs" in fails("reward.py", thumbs, "--margin_column", "m")
    assert "--batch_size must be at least 2" in fails("kto.py", thumbs, "--batch_size", 1)
    assert "1 held-out row" in fails("kto.py", thumbs, "--num_eval_rows", 1)
    assert "expected one of {prompt, completion, label}" in fails("kto.py", f"{WORLD}/preference")


def test_another_rating_scale_and_whole_floats_are_ratings(sft_model, tmp_path):
    rows = read_jsonl(f"{WORLD}/ratings/train.jsonl")[:16]
    data = write_jsonl(tmp_path / "ten.jsonl", [{**r, "rating": [9.0, 0, 10][i % 3]} for i, r in enumerate(rows)])
    pairs = world_subset(tmp_path / "pairs", "preference", 8, 8)
    args = ["--dataset_name", data, "--rating_scale", 0, 10, "--eval_dataset_name", pairs, "--rating_loss", "ordinal"]
    run("reward.py", "--model_name_or_path", sft_model, "--output_dir", tmp_path / "o", *args, *QUICK,
        "--num_normalisation_rows", 8)  # fmt: skip
    assert json.load(open(tmp_path / "o" / "eval.json"))["steps"] == 2


# ---- learning ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def feedback_runs(sft_model, tmp_path_factory):
    """Reward models from the world's ratings and from its thumbs (100 steps of 64 responses each, evaluated on the
    held-out pairs) and KTO on its thumbs (100 steps of 32 rows, 64 held-out rows), from the session's SFT model,
    side by side."""
    out = tmp_path_factory.mktemp("feedback")
    rm = f"--model_name_or_path {sft_model} --max_steps 100 --eval_every 1000 --num_normalisation_rows 500"
    rm += " --num_eval_rows None"  # the world's 1,000 held-out pairs
    run_side_by_side(
        f"reward.py {rm} --dataset_name {WORLD}/ratings --output_dir {out}/ratings",
        f"reward.py {rm} --dataset_name {WORLD}/binary --output_dir {out}/thumbs",
        f"kto.py --model_name_or_path {sft_model} --output_dir {out}/kto --max_steps 100 --learning_rate 5e-5 "
        "--eval_every 1000 --num_eval_prompts 128 --num_eval_rows 64",
    )
    return {name: str(out / name) for name in ("ratings", "thumbs", "kto")}


@pytest.mark.parametrize("form", ["ratings", "thumbs"])
def test_reward_models_from_ratings_and_thumbs_order_held_out_pairs(feedback_runs, form):
    """Judged on the held-out pairs, as a model from pairs is: accuracy 0.672, 0.767 and 0.778 from the ratings, 0.740,
    0.713 and 0.759 from the thumbs (seeds 0-2), from the tests' SFT model; chance is 0.5 +- 0.016."""
    results = json.load(open(os.path.join(feedback_runs[form], "eval.json")))
    assert results["gold_label_agreement"] == pytest.approx(0.899, abs=0.001)  # by default the world's held-out pairs
    assert results["rewards/accuracies"] > 0.62 and results["gold_agreement"] > 0.62  # 7 standard errors over chance


def test_kto_raises_the_gold_score_over_the_sft_policy(feedback_runs):
    """Seeds 0-2: gold win rate 0.719, 0.668 and 0.680 against the SFT policy on 128 prompts (binomial standard error
    0.04), gold score +0.30, +0.34 and +0.31 over the SFT policy's."""
    results = json.load(open(os.path.join(feedback_runs["kto"], "eval.json")))
    assert results["gold_win_rate_vs_ref"] > 0.6
    assert results["gold_score"] > results["gold_score_ref"] + 0.1
    assert results["kl_to_ref"] > 0 and results["rewards/desirable"] > results["rewards/undesirable"]


def summed_logps(model, tok, prompt, completion):
    """log pi(completion | prompt), summed over the completion's tokens and its EOS, one sequence at a time."""
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logprobs = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
    return sum(float(logprobs[len(p) - 1 + t, token]) for t, token in enumerate(c))


def test_kto_held_out_z0_and_loss_recomputed_alone(feedback_runs, sft_model, tmp_path):
    """eval.json's kl (z0) and loss, recomputed one sequence at a time: each held-out prompt with the next row's
    completion, the last with the first's. On the world the trained policy gives the mismatched pairs less probability
    than the SFT reference does (z0 clamped to 0), so the SFT model is also evaluated against the trained policy as its
    reference (learning rate 0), where the mean log-ratio is positive."""
    trained, swapped = feedback_runs["kto"], str(tmp_path / "swapped")
    args = ["--model_name_or_path", sft_model, "--ref_model_name_or_path", trained, "--learning_rate", 0]
    args += ["--max_steps", 1, "--batch_size", 2, "--num_eval_rows", 64, "--num_eval_prompts", 4, "--max_new_tokens", 4]
    run("kto.py", *args, "--output_dir", swapped)
    tok = AutoTokenizer.from_pretrained(sft_model)
    models = {m: AutoModelForCausalLM.from_pretrained(m).eval() for m in (sft_model, trained)}
    rows = read_jsonl(f"{WORLD}/binary/test.jsonl")[:64]
    for output, policy, ref in ((trained, trained, sft_model), (swapped, sft_model, trained)):
        ratio = [
            [summed_logps(models[policy], tok, p, c) - summed_logps(models[ref], tok, p, c) for p, c in pairs]
            for pairs in (
                [(r["prompt"], rows[(i + 1) % len(rows)]["completion"]) for i, r in enumerate(rows)],  # mismatched
                [(r["prompt"], r["completion"]) for r in rows],
            )
        ]
        z0 = max(0.0, sum(ratio[0]) / len(rows))
        results = json.load(open(os.path.join(output, "eval.json")))
        assert results["kl"] == pytest.approx(z0, rel=1e-3, abs=1e-5)
        losses = [
            1 - sig(0.1 * (x - z0)) if row["label"] else 1 - sig(0.1 * (z0 - x))
            for x, row in zip(ratio[1], rows, strict=True)
        ]
        assert results["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert results["kl"] > 0.1  # the swapped run's z0: not the clamp's 0


# ---- corrections --------------------------------------------------------------------------------------------
def corrected(completion: str) -> str:
    """An annotator's edit of a response: its worst sentence for the gold rater deleted (when it has two or more)."""
    sentences = [s.strip() for s in re.findall(r"[^.!?]+[.!?]", completion)]
    if len(sentences) > 1:
        sentences.remove(min(sentences, key=gold_score))
    return " " + " ".join(sentences)


def test_corrections_train_sft_as_they_are_and_reward_models_as_pairs(sft_model, tmp_path):
    """A correction is a demonstration ({prompt, completion}: the edit), and a preference of the edit over the
    original ({prompt, chosen, rejected}): sft.py, reward.py and dpo.py take them as they are."""
    rows = read_jsonl(f"{WORLD}/sft/train.jsonl")[:64]
    edits = [corrected(r["completion"]) for r in rows]
    change = [gold_score(e) - gold_score(r["completion"]) for e, r in zip(edits, rows, strict=True)]
    assert sum(change) > 0 and sum(d > 0 for d in change) > 2 * sum(d < 0 for d in change)  # the edits mostly help
    demos = write_jsonl(
        tmp_path / "edits.jsonl", [{"prompt": r["prompt"], "completion": e} for r, e in zip(rows, edits, strict=True)]
    )
    pairs = [
        {"prompt": r["prompt"], "chosen": e, "rejected": r["completion"]} for r, e in zip(rows, edits, strict=True)
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [p for p in pairs if p["chosen"] != p["rejected"]])
    quick = [*QUICK, "--model_name_or_path", sft_model, "--eval_every", 1000]
    run("sft.py", *quick, "--dataset_name", demos, "--output_dir", tmp_path / "sft", "--num_eval_prompts", 4)
    run("reward.py", *quick, "--dataset_name", pairs, "--output_dir", tmp_path / "rm", "--num_normalisation_rows", 16)
    run("dpo.py", *quick, "--dataset_name", pairs, "--output_dir", tmp_path / "dpo", "--num_eval_prompts", 4)
    assert all(os.path.isfile(tmp_path / d / "eval.json") for d in ("sft", "rm", "dpo"))
