"""benchmarks/iterated.py's loop with tiny budgets: two rounds of PPO, labelling of the policy's own samples by the
simulated annotator, and a reward model retrained on everything labelled so far."""

import json
import os
import subprocess
import sys

from conftest import ENV, ROOT, WORLD, read_jsonl, world_subset, write_jsonl


def test_two_rounds_of_iterated_rlhf(sft_model, reward_model, tmp_path):
    human = world_subset(tmp_path / "human", "preference", 48, 8)
    out = tmp_path / "iterated"
    ppo = "--batch_size 8 --micro_batch_size 8 --num_eval_prompts 8 --eval_every 1000 --response_length 8 "
    ppo += "--max_new_tokens 8 --log_samples_every 1000"
    reward = "--max_steps 2 --batch_size 8 --micro_batch_size 8 --num_normalisation_rows 16"
    command = [sys.executable, "benchmarks/iterated.py", "--sft_model", sft_model, "--reward_model", reward_model,
               "--preference_data", human, "--rounds", "2", "--kl_coefs", "0.0", "--episodes_per_round", "16",
               "--label_prompts", "12", "--heldout_prompts", "8", "--response_length", "8", f"--ppo_args={ppo}",
               f"--reward_args={reward}", "--output_dir", str(out)]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = read_jsonl(out / "kl_0.0" / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and [r["episodes"] for r in rounds] == [16, 32]
    assert [r["labelled_pairs"] for r in rounds] == [48 + 12, 48 + 24]  # the world's pairs, then each round's
    for r in rounds:
        assert 0 <= r["rm_accuracy_on_policy"] <= 1 and 0 <= r["new_rm_accuracy_on_policy"] <= 1
        assert 0 <= r["labels_ceiling"] <= 1
    # round 1 continued from round 0's policy, against round 0's retrained reward model, with the SFT reference
    args = json.load(open(out / "kl_0.0" / "ppo_1" / "run.json"))["args"]
    assert args["model_name_or_path"].endswith("ppo_0") and args["reward_model_name_or_path"].endswith("reward_1")
    assert args["ref_model_name_or_path"] == sft_model
    labels = read_jsonl(out / "kl_0.0" / "labels_1" / "train.jsonl")
    assert len(labels) == 72 and all({"prompt", "chosen", "rejected"} <= set(r) for r in labels)
    assert "| kl_coef 0.0 | 1 | 32 |" in proc.stdout and os.path.exists(out / "iterated.svg")


def test_the_real_model_recipe_asks_only_for_flags_the_scripts_have(tmp_path):
    """benchmarks/real_model.py (an hour on SmolLM2, not run here): every stage's command parses with its script's
    own Args, the held-out pairs it labels are the world's test pairs, and its table reads the runs' results."""
    import shlex

    import tyro

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import real_model

    recipe = real_model.Args(output_dir=str(tmp_path), model="runs/smollm2", heldout_pairs=5)
    recipe.judge_model, recipe.judge_pairs = "runs/qwen_coder", 3  # the second labeller's stages too
    model, chat = real_model.prepare(recipe, str(tmp_path))
    assert len(read_jsonl(os.path.join(chat, "heldout_pairs", "test.jsonl"))) == 5
    train = read_jsonl(os.path.join(WORLD, "preference", "train.jsonl"))
    judge_pairs = read_jsonl(os.path.join(chat, "judge_pairs", "train.jsonl"))  # the world's first training pairs
    assert [r["chosen"][0]["content"].strip() for r in judge_pairs] == [r["chosen"].strip() for r in train[:3]]
    assert read_jsonl(os.path.join(chat, "heldout_pairs", "test.jsonl"))[0]["prompt"][0]["role"] == "system"
    lines = real_model.stages(recipe, model, chat, str(tmp_path))
    assert list(lines)[:6] == ["sft", "reward", "dpo", "ppo", "rlaif_direct", "rlaif_pairwise"]
    assert list(lines)[-5:] == ["judge_pairwise", "judge_direct", "judge_labels", "reward_judge", "ppo_judge"]
    for name, line in lines.items():
        script, *rest = shlex.split(line)
        module = __import__(script.removesuffix(".py"))
        args = tyro.cli(module.Args, args=[*rest, "--output_dir", str(tmp_path / name)])
        assert args.output_dir == str(tmp_path / name), name
    os.makedirs(tmp_path / "ppo")
    result = {"gold_win_rate_vs_ref": 0.625, "kl_to_ref": 1.5, "gold_score": 0.3, "gold_score_ref": 0.1,
              "rm_score": 2.0, "eos_rate": 1.0, "distinct_2": 0.2, "mean_length": 20.0}  # fmt: skip
    json.dump(result, open(tmp_path / "ppo" / "eval.json", "w"))
    os.makedirs(tmp_path / "judge_pairwise")  # a labelling: one pair of equal lengths, one where it picked the longer
    figures = {"test_gold_agreement": 0.75, "test_label_agreement": 0.5, "test_labeller_flip_rate": 0.125,
               "test_labeller_confidence": 0.8}  # fmt: skip
    json.dump(figures, open(tmp_path / "judge_pairwise" / "labelling.json", "w"))
    prompt = [{"role": "user", "content": "So I went to see The Silent Harbor."}]
    pairs = [(" A wonderful film.", " A dull film."), (" A wonderful film, and the cast is great.", " It is awful.")]
    labelled = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}], "label": 0.9} for c, r in pairs]  # fmt: skip
    write_jsonl(tmp_path / "judge_pairwise" / "test.jsonl", labelled)
    table = real_model.table(str(tmp_path), {"ppo": 120.0})
    assert "| `ppo.py` | 2 min | **0.625** | 1.50 | 0.300 (0.100) | 2.00 | 1.00 | 0.200 | 20.0 |" in table
    assert "flip rate 0.12, confidence 0.800, picks the longer 1.000 of 1 pairs (the gold rater 1.000) |" in table


def test_the_constitutional_ai_recipe_asks_only_for_flags_the_scripts_have(tmp_path):
    """benchmarks/cai.py (40 minutes on SmolLM2, not run here): every stage's command parses with its script's own
    Args, in the order of the two stages, and its tables read the runs' results."""
    import shlex

    import tyro

    sys.path.insert(0, ROOT)
    from benchmarks import cai

    recipe = cai.Args(output_dir=str(tmp_path), model="runs/smollm2")
    lines = cai.stages(recipe, "runs/smollm2", str(tmp_path / "chat"), str(tmp_path))
    assert list(lines) == ["revise", "sl_cai", "rlaif_start", "rlaif_sl_cai"]
    for name, line in lines.items():
        script, *rest = shlex.split(line)
        args = tyro.cli(__import__(script.removesuffix(".py")).Args, args=[*rest, "--output_dir", str(tmp_path / name)])
        assert args.output_dir == str(tmp_path / name), name
    assert lines["revise"].startswith("sl_cai.py ") and f"{tmp_path}/revise" in lines["sl_cai"]
    assert f"{tmp_path}/sl_cai" in lines["rlaif_sl_cai"]
    os.makedirs(tmp_path / "sl_cai")
    result = {"gold_win_rate_vs_ref": 0.5, "kl_to_ref": 1.25, "gold_score": 0.3, "gold_score_ref": 0.2,
              "eos_rate": 0.5, "distinct_2": 0.7, "mean_length": 35.0}  # fmt: skip
    json.dump(result, open(tmp_path / "sl_cai" / "eval_vs_start.json", "w"))
    assert "| SL-CAI: SFT on the revisions | 23 s | 0.300 (0.200) | **0.500** | 1.25 | 0.50 | 0.700 | 35.0 |" in (
        cai.tables(str(tmp_path), {"sl_cai": 23.0})
    )
