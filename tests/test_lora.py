"""LoRA (--lora_r) in every training script: what is trained, the reference as the policy with its adapters off,
the merged output and its adapter, the first step's KL and margins, kill-and-resume, learning.

    python -m pytest -q tests/test_lora.py
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import plumbing
from conftest import WORLD, read_jsonl, run, run_side_by_side, world_subset

LORA = SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules=None)


def tiny(cls=AutoModelForCausalLM, **kwargs):
    """The world's base model at random, seeded (a reward model: one label)."""
    torch.manual_seed(0)
    return cls.from_config(AutoConfig.from_pretrained(f"{WORLD}/base", **kwargs)).eval()


def perturb_adapters(model):
    """LoRA's B starts at 0 (the adapted model is the base): give it values, as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def logprobs(model, ids):
    return common.forward_logprobs(model, ids, torch.ones_like(ids))


def test_only_the_adapters_and_the_heads_copies_are_trained():
    policy = common.add_lora(tiny(), LORA)
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    # by default every linear layer inside the transformer blocks, named as the model names them (not lm_head)
    assert set(policy.lora_config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}  # fmt: skip
    rank = LORA.lora_r * 7 * policy.config.num_hidden_layers  # A: r x d_in, B: d_out x r, per adapted layer
    assert 0 < sum(p.numel() for n, p in policy.named_parameters() if p.requires_grad) < rank * 2 * 1024
    reward = common.add_lora(tiny(AutoModelForSequenceClassification, num_labels=1), LORA, heads=["score"])
    trained = [n for n, p in reward.named_parameters() if p.requires_grad]
    assert "score.modules_to_save.default.weight" in trained  # the head in full, as a copy
    assert all(".lora_" in n or n.startswith("score.modules_to_save.") for n in trained)
    assert not reward.score.original_module.weight.requires_grad
    with pytest.raises(SystemExit, match="not among the model's layers"):
        common.add_lora(tiny(), SimpleNamespace(**{**vars(LORA), "lora_target_modules": ("qkv",)}))


def test_the_reference_is_the_policy_with_its_adapters_off_and_no_second_copy():
    base = tiny()
    policy = common.add_lora(tiny(), LORA)
    ids = torch.randint(0, 1000, (3, 12))
    assert torch.equal(logprobs(policy, ids), logprobs(base, ids))  # B = 0: before training, one function
    perturb_adapters(policy)
    ref = common.WithoutAdapters(policy)
    with torch.inference_mode():
        assert not torch.allclose(logprobs(policy, ids), logprobs(base, ids))
        assert torch.equal(logprobs(ref, ids), logprobs(base, ids))  # the adapters off: exactly the base model
        assert not torch.allclose(logprobs(policy, ids), logprobs(ref, ids))  # and on again after the call
    held = {id(p) for m in (policy, ref) for p in m.parameters()}
    assert held == {id(p) for p in policy.parameters()}  # the reference holds no parameter of its own
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".lora_" in n)  # still trainable


def test_the_merged_output_equals_the_adapted_model_and_its_adapter_loads_in_peft(tmp_path):
    base = tiny()
    base.save_pretrained(tmp_path / "base")
    policy = common.add_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LORA)
    perturb_adapters(policy)
    plumbing.save_model(policy, str(tmp_path / "out"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    assert not any("lora" in k or "base_layer" in k for k in load_file(tmp_path / "out" / "model.safetensors"))
    ids = torch.randint(0, 1000, (3, 12))
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids).logits, policy(ids).logits, atol=1e-5, rtol=1e-5)
        adapted = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out" / "adapter"
        )
        torch.testing.assert_close(adapted(ids).logits, policy(ids).logits, atol=1e-5, rtol=1e-5)
    # a reward model: its head's trained copy is the merged model's head, and the adapter's
    reward = common.add_lora(tiny(AutoModelForSequenceClassification, num_labels=1), LORA, heads=["score"])
    perturb_adapters(reward)
    with torch.no_grad():
        reward.score.modules_to_save.default.weight.add_(1.0)
    plumbing.save_model(reward, str(tmp_path / "rm"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, reward(ids).logits, atol=1e-5, rtol=1e-5)
    assert "base_model.model.score.weight" in load_file(tmp_path / "rm" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def lora_runs(sft_model, tmp_path_factory):
    """Every training script with --lora_r 8 for a step or two on the world, two or three side by side at a time."""
    out = tmp_path_factory.mktemp("lora")
    small = world_subset(out / "pairs", "preference", 64, 16)
    lora = "--lora_r 8 --lora_alpha 16 --log_every 1 --eval_every 1000"
    policy = f"--model_name_or_path {sft_model} --num_eval_prompts 4 --max_new_tokens 8 {lora}"
    run_side_by_side(
        f"sft.py {policy} --dataset_name {WORLD}/sft --output_dir {out}/sft --max_steps 2 --batch_size 8",
        f"reward.py --model_name_or_path {sft_model} --dataset_name {small} --output_dir {out}/reward --max_steps 2 "
        f"--batch_size 8 --micro_batch_size 8 --num_normalisation_rows 16 {lora}",
    )
    rollout = "--total_episodes 16 --batch_size 8 --micro_batch_size 8 --response_length 8"
    run_side_by_side(
        f"dpo.py {policy} --dataset_name {small} --output_dir {out}/dpo --max_steps 2 --batch_size 8 "
        "--micro_batch_size 8",
        f"ppo.py {policy} --reward_model_name_or_path {out}/reward --output_dir {out}/ppo {rollout}",
    )
    run_side_by_side(
        f"rloo.py {policy} --reward_model_name_or_path {out}/reward --output_dir {out}/rloo --total_episodes 8 "
        "--batch_size 4 --micro_batch_size 4 --response_length 8",
        f"rlaif.py {policy} --output_dir {out}/rlaif {rollout}",
        f"kto.py {policy} --dataset_name {world_subset(out / 'thumbs', 'binary', 64, 16)} --output_dir {out}/kto "
        "--max_steps 2 --batch_size 8 --micro_batch_size 8",
    )
    return out


@pytest.mark.parametrize("script", ["sft", "reward", "dpo", "ppo", "rloo", "rlaif", "kto"])
def test_every_script_writes_a_plain_model_and_its_adapter(lora_runs, script):
    out = lora_runs / script
    cls = AutoModelForSequenceClassification if script == "reward" else AutoModelForCausalLM
    model = cls.from_pretrained(out)
    assert not any("lora" in name or "base_layer" in name for name, _ in model.named_parameters())
    adapter = json.load(open(out / "adapter" / "adapter_config.json"))
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
    assert adapter["modules_to_save"] == (["score"] if script == "reward" else None)
    assert os.path.exists(out / "eval.json")
    if script == "ppo":  # its value model: the reward model's backbone with its own adapters and head
        value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
        reward = AutoModelForSequenceClassification.from_pretrained(lora_runs / "reward")
        assert not torch.equal(value.score.weight, reward.score.weight)  # trained
        assert os.path.exists(out / "value_model" / "adapter" / "adapter_model.safetensors")


def test_the_first_step_starts_from_the_reference(lora_runs):
    """Before the first update the policy is its reference: PPO's and RLOO's KL and the implicit rewards of DPO and
    online RLAIF are 0 (exactly where both log-probs come from one forward's shapes; DPO's reference log-probs were
    computed before training in other batches, whose padding moves a sum by float rounding)."""
    first = {s: read_jsonl(lora_runs / s / "metrics.jsonl")[0] for s in ("ppo", "rloo", "dpo", "rlaif", "kto")}
    assert first["ppo"]["step"] == 1 and first["ppo"]["objective/kl"] == 0
    assert first["rloo"]["objective/kl"] == 0
    assert first["rlaif"]["rewards/margins"] == 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first["dpo"][key] == pytest.approx(0, abs=1e-6)
    for key in ("rewards/desirable", "rewards/undesirable", "rewards/margins"):  # KTO's, computed the same way
        assert first["kto"][key] == pytest.approx(0, abs=1e-6)


def test_the_reference_and_reward_model_are_not_second_copies(sft_model, lora_runs, tmp_path):
    """ppo.py prints the parameters it holds: with LoRA one policy base and one reward-model base (and adapters),
    where full fine-tuning holds four models."""
    args = ["--model_name_or_path", sft_model, "--reward_model_name_or_path", lora_runs / "reward", "--max_steps", 1]
    args += ["--batch_size", 4, "--micro_batch_size", 4, "--response_length", 4, "--num_eval_prompts", 2]
    args += ["--max_new_tokens", 4, "--eval_every", 1000, "--lora_r", 8]
    stdout = run("ppo.py", *args, "--output_dir", tmp_path / "out").stdout
    line = next(x for x in stdout.splitlines() if "parameters in memory" in x)
    held = float(line.split("M parameters in memory")[0])
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sft_model).parameters()) / 1e6
    assert 2 * n < held < 2.1 * n  # two bases and their adapters, not 4 n


def test_killed_and_resumed_with_lora_ends_with_the_same_adapters(sft_model, small_sft, tmp_path):
    from test_reliability import SFT_SMALL, assert_same_weights, kill_after_first_checkpoint

    args = [*SFT_SMALL, "--model_name_or_path", sft_model, "--dataset_name", small_sft, "--save_every", 10]
    args += ["--lora_r", 8, "--learning_rate", 1e-3]
    run("sft.py", "--output_dir", tmp_path / "straight", *args)
    assert kill_after_first_checkpoint("sft.py", tmp_path / "killed", *args) == 10
    run("sft.py", "--output_dir", tmp_path / "killed", *args, "--resume")
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")  # the merged models, bit for bit
    adapters = [load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("straight", "killed")]
    assert adapters[0].keys() == adapters[1].keys() and all(
        torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0]
    )


@pytest.fixture(scope="module")
def lora_learning_runs(sft_model, reward_model, tmp_path_factory):
    """DPO (120 steps of 32 pairs) and PPO (16 steps of 32 episodes, against the session's reward model) with
    --lora_r 8, side by side, at the learning rates LoRA needs here (20 and 50 times those of conftest's full
    fine-tuning runs); the seeds' results: docs/results.md, "LoRA learning on the world"."""
    out = tmp_path_factory.mktemp("lora_learning")
    dpo_data = world_subset(out / "preference", "preference", None, 250)
    policy = f"--model_name_or_path {sft_model} --eval_every 1000 --lora_r 8 --lora_alpha 16"
    run_side_by_side(
        f"dpo.py {policy} --dataset_name {dpo_data} --output_dir {out}/dpo --max_steps 120 --learning_rate 1e-3 "
        "--num_eval_prompts 128",
        f"ppo.py {policy} --reward_model_name_or_path {reward_model} --output_dir {out}/ppo --total_episodes 512 "
        f"--batch_size 32 --micro_batch_size 32 --learning_rate 3e-3 --num_eval_prompts 256",
    )
    return out


def test_dpo_and_ppo_with_lora_raise_the_gold_score(lora_learning_runs):
    """Margins below what each of seeds 0-3 cleared (a win rate's standard error: 0.03 on 256 prompts, 0.04 on 128)."""
    dpo = json.load(open(lora_learning_runs / "dpo" / "eval.json"))  # seeds 0-3: 0.78-0.87 wins, +0.52 to +0.65
    assert dpo["gold_win_rate_vs_ref"] > 0.65 and dpo["gold_score"] > dpo["gold_score_ref"] + 0.3
    assert dpo["eos_rate"] > 0.9
    ppo = json.load(open(lora_learning_runs / "ppo" / "eval.json"))  # seeds 0-3: 0.63-0.80 wins, +0.28 to +0.54
    assert ppo["gold_win_rate_vs_ref"] > 0.58 and ppo["gold_score"] > ppo["gold_score_ref"] + 0.2
    assert 0 < ppo["kl_to_ref"] < 20 and ppo["eos_rate"] > 0.9
