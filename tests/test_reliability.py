"""Resume after SIGKILL, determinism, non-finite values, and a user's mistakes in every script."""

import contextlib
import io
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import ENV, ROOT, WORLD, read_jsonl, run, write_jsonl

SFT_SMALL = [
    "--max_steps",
    30,
    "--batch_size",
    8,
    "--micro_batch_size",
    4,
    "--eval_every",
    1000,
    "--num_eval_prompts",
    4,
    "--max_new_tokens",
    4,
]


def untimed(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit for bit, on CPU


def kill_after_first_checkpoint(script, out, *args):
    """Start a run, SIGKILL it as soon as its first checkpoint exists; return the step it was written at."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), "--output_dir", str(out), *map(str, args)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = os.path.join(out, "checkpoint", "state.pt")
    deadline = time.time() + 300
    while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(state), "the run ended before writing a checkpoint"
    assert not os.path.exists(os.path.join(out, "model.safetensors")), "killed too late: the run had finished"
    return torch.load(state, weights_only=True)["step"]


def test_sft_killed_and_resumed_ends_with_the_same_weights(small_sft, tmp_path):
    args = [*SFT_SMALL, "--dataset_name", small_sft, "--save_every", 10]
    run("sft.py", "--output_dir", tmp_path / "straight", *args)
    step = kill_after_first_checkpoint("sft.py", tmp_path / "killed", *args)
    assert step == 10
    # resuming with other arguments would be another run: refused, naming what changed
    changed = run("sft.py", "--output_dir", tmp_path / "killed", *args, "--resume", "--max_steps", 40, ok=False)
    assert "--max_steps 30 -> 40" in one_line(changed)
    run("sft.py", "--output_dir", tmp_path / "killed", *args, "--resume")
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    straight, resumed = (untimed(read_jsonl(tmp_path / d / "metrics.jsonl")) for d in ("straight", "killed"))
    assert straight == resumed
    assert not os.path.exists(tmp_path / "killed" / "checkpoint")  # the final output replaces the checkpoint


def test_ppo_killed_and_resumed_ends_with_the_same_weights(sft_model, reward_model, tmp_path):
    args = [
        "--model_name_or_path",
        sft_model,
        "--reward_model_name_or_path",
        reward_model,
        "--max_steps",
        4,
        "--batch_size",
        8,
        "--micro_batch_size",
        4,
        "--num_mini_batches",
        2,
        "--response_length",
        8,
        "--num_eval_prompts",
        4,
        "--eval_every",
        2,
        "--save_every",
        2,
    ]
    run("ppo.py", "--output_dir", tmp_path / "straight", *args)
    assert kill_after_first_checkpoint("ppo.py", tmp_path / "killed", *args) == 2
    run("ppo.py", "--output_dir", tmp_path / "killed", *args, "--resume")
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    assert_same_weights(tmp_path / "straight" / "value_model", tmp_path / "killed" / "value_model")
    curves = [read_jsonl(tmp_path / d / "curve.jsonl") for d in ("straight", "killed")]
    assert curves[0] == curves[1]


def test_rloo_killed_and_resumed_ends_with_the_same_weights(sft_model, reward_model, tmp_path):
    args = (
        f"--model_name_or_path {sft_model} --reward_model_name_or_path {reward_model} --max_steps 4 --batch_size 4 "
        "--rloo_k 2 --micro_batch_size 2 --num_mini_batches 2 --response_length 8 --max_new_tokens 8 "
        "--num_eval_prompts 4 --eval_every 2 --save_every 2 --baseline grpo"
    ).split()
    run("rloo.py", "--output_dir", tmp_path / "straight", *args)
    assert kill_after_first_checkpoint("rloo.py", tmp_path / "killed", *args) == 2
    run("rloo.py", "--output_dir", tmp_path / "killed", *args, "--resume")
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    curves = [read_jsonl(tmp_path / d / "curve.jsonl") for d in ("straight", "killed")]
    assert curves[0] == curves[1]


def test_same_seed_same_loss_curve(small_sft, tmp_path):
    args = [*SFT_SMALL, "--dataset_name", small_sft, "--max_steps", 12]
    run("sft.py", "--output_dir", tmp_path / "a", *args)
    run("sft.py", "--output_dir", tmp_path / "b", *args)
    a, b = (untimed(read_jsonl(tmp_path / d / "metrics.jsonl")) for d in ("a", "b"))
    assert a == b and any("train/loss" in r for r in a)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    run("sft.py", "--output_dir", tmp_path / "c", *args, "--seed", 2)
    assert read_jsonl(tmp_path / "c" / "metrics.jsonl")[0]["train/loss"] != a[0]["train/loss"]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_output(small_sft, tmp_path):
    out = tmp_path / "sft"
    run("sft.py", "--output_dir", out, *SFT_SMALL, "--dataset_name", small_sft, "--max_steps", 2)
    before = weights(out)
    # an update that overflows: AdamW's decay factor 1 - lr * weight_decay is -inf in fp32, so are the weights
    # (no warmup: its first step's learning rate would be 0, and the first update harmless)
    overflow = ["--learning_rate", "1e30", "--weight_decay", "1e30", "--warmup_steps", "0"]
    proc = run("sft.py", "--output_dir", out, *SFT_SMALL, "--dataset_name", small_sft, *overflow, ok=False)
    error = one_line(proc)
    assert "non-finite loss at step 2" in error  # step 1's loss is finite; its update is not
    for k, v in weights(out).items():
        assert torch.equal(v, before[k])
    # --skip_nonfinite skips the batches whose loss is not finite; here the weights themselves went bad (step 1's
    # update), so the run still ends, with one line saying so, at the evaluation, and saves nothing
    skipped = run(
        "sft.py",
        "--output_dir",
        tmp_path / "skip",
        *SFT_SMALL,
        "--dataset_name",
        small_sft,
        "--max_steps",
        3,
        *overflow,
        "--skip_nonfinite",
        ok=False,
    )
    assert "batch skipped" in skipped.stdout
    assert "weights are not finite" in one_line(skipped)
    assert not os.path.exists(tmp_path / "skip" / "model.safetensors")


def one_line(proc):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


# ---- the bad-input matrix: every script, every mistake, run in-process (no 5 s import per case) ------
def run_inprocess(script, *args, stdout=False):
    """Run a script as __main__ with these arguments; return its error line (it must exit with one), and
    what it printed when `stdout`."""
    argv, out = sys.argv, io.StringIO()
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = argv
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return (message, out.getvalue()) if stdout else message


@pytest.fixture(scope="module")
def bad(tmp_path_factory, sft_model, reward_model):
    d = tmp_path_factory.mktemp("bad")
    pref = read_jsonl(f"{WORLD}/preference/train.jsonl")[:40]
    (d / "empty.jsonl").write_text("")
    write_jsonl(
        d / "misspelt.jsonl",
        [
            {"promt": r["prompt"], "chosen": r["chosen"], "rejectd": r["rejected"], "completon": r["chosen"]}
            for r in pref
        ],
    )
    write_jsonl(
        d / "long.jsonl",
        [
            {"prompt": r["prompt"] * 40, "chosen": r["chosen"], "rejected": r["rejected"], "completion": r["chosen"]}
            for r in pref
        ],
    )
    write_jsonl(
        d / "chat.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "completion": r["chosen"],
            }
            for r in pref
        ],
    )
    no_template = d / "no_template"
    shutil.copytree(sft_model, no_template)
    tok = AutoTokenizer.from_pretrained(no_template)
    tok.chat_template = None
    tok.save_pretrained(no_template)
    if os.path.exists(no_template / "chat_template.jinja"):
        os.remove(no_template / "chat_template.jinja")

    def rows_with(prompt):  # the first 40 pairs, each with this prompt
        return [
            {"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"], "completion": r["chosen"]}
            for r in pref
        ]

    write_jsonl(d / "number.jsonl", rows_with(5))
    write_jsonl(d / "no_content.jsonl", rows_with([{"role": "user", "text": "I saw it."}]))
    write_jsonl(d / "narrator.jsonl", rows_with([{"role": "narrator", "content": "I saw it."}]))
    (d / "latin1.jsonl").write_bytes((d / "chat.jsonl").read_bytes().replace(b"So I", "Caf\xe9 I".encode("latin-1")))
    corrupt = d / "corrupt"  # the SFT model with its weights file cut in half
    shutil.copytree(sft_model, corrupt)
    weights_file = corrupt / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    (d / "other").mkdir()
    (d / "other" / "notes.txt").write_text("someone else's work")
    return {"dir": d, "sft": sft_model, "rm": reward_model, "no_template": str(no_template), "corrupt": str(corrupt)}


SCRIPTS = {  # each script's arguments pointing at good inputs, and the argument naming its dataset
    "sft.py": lambda b: ["--model_name_or_path", b["sft"]],
    "reward.py": lambda b: ["--model_name_or_path", b["sft"]],
    "dpo.py": lambda b: ["--model_name_or_path", b["sft"]],
    "ppo.py": lambda b: ["--model_name_or_path", b["sft"], "--reward_model_name_or_path", b["rm"]],
    "rlaif.py": lambda b: ["--model_name_or_path", b["sft"], "--judge_model_name_or_path", b["sft"]],
    "rloo.py": lambda b: ["--model_name_or_path", b["sft"], "--reward_model_name_or_path", b["rm"]],
    "sl_cai.py": lambda b: ["--model_name_or_path", b["sft"]],
}
CASES = {  # case -> (extra arguments, words the error must contain)
    "missing path": (lambda b: ["--dataset_name", b["dir"] / "nope.jsonl"], ["nope.jsonl", "does not exist"]),
    "empty dataset": (lambda b: ["--dataset_name", b["dir"] / "empty.jsonl"], ["empty"]),
    "misspelt column": (lambda b: ["--dataset_name", b["dir"] / "misspelt.jsonl"], ["expected one of"]),
    "hub name offline": (lambda b: ["--dataset_name", "someone/missing-dataset"], ["someone/missing-dataset"]),
    "model path missing": (lambda b: ["--model_name_or_path", b["dir"] / "no_model"], ["no_model", "does not exist"]),
    "prompts too long": (lambda b: ["--dataset_name", b["dir"] / "long.jsonl"], ["fits in"]),
    "chat data, no template": (
        lambda b: ["--dataset_name", b["dir"] / "chat.jsonl", "--model_name_or_path", b["no_template"]],
        ["chat template"],
    ),
    "a prompt that is a number": (lambda b: ["--dataset_name", b["dir"] / "number.jsonl"], ["row 0", "'prompt'"]),
    "chat message without content": (
        lambda b: ["--dataset_name", b["dir"] / "no_content.jsonl"],
        ["row 0", "without a string 'content'"],
    ),
    "chat message of an unknown role": (lambda b: ["--dataset_name", b["dir"] / "narrator.jsonl"], ["'narrator'"]),
    "not UTF-8": (lambda b: ["--dataset_name", b["dir"] / "latin1.jsonl"], ["latin1.jsonl", "not UTF-8"]),
    "corrupt weights": (lambda b: ["--model_name_or_path", b["corrupt"]], ["corrupt", "could not load"]),
    "output_dir of another run": (lambda b: ["--output_dir", b["dir"] / "other"], ["already holds"]),
    "resume without checkpoint": (lambda b: ["--resume"], ["no checkpoint"]),
}


@pytest.mark.parametrize(  # sl_cai.py writes no checkpoints: it has no --resume
    "script,case", [(s, c) for s in SCRIPTS for c in CASES if (s, c) != ("sl_cai.py", "resume without checkpoint")]
)
def test_bad_input_matrix(bad, script, case, tmp_path):
    extra, words = CASES[case]
    args = [*SCRIPTS[script](bad), "--output_dir", tmp_path / "out", *extra(bad)]
    if script == "rlaif.py" and case == "chat data, no template":
        args += ["--judge_model_name_or_path", bad["no_template"]]
    message = run_inprocess(script, *args)
    for w in words:
        assert str(w) in message, message
    assert not os.path.exists(tmp_path / "out") or case == "resume without checkpoint"
    assert (bad["dir"] / "other" / "notes.txt").read_text() == "someone else's work"


@pytest.mark.parametrize(
    "script,args,words",
    [
        ("sft.py", ["--micro_batch_size", 0], "--micro_batch_size must be in (0, inf), got 0"),
        ("sft.py", ["--learning_rate", -1e-5], "--learning_rate must be in [0, inf), got -1e-05"),
        ("sft.py", ["--adam_betas", 0.9, 1.0], "--adam_betas must be in [0, 1), got (0.9, 1.0)"),
        ("dpo.py", ["--eval_temperature", 0], "--eval_temperature must be in (0, inf)"),  # not greedy: logits / 0
        ("dpo.py", ["--beta", 0], "--beta must be in (0, inf)"),
        ("dpo.py", ["--beta", "nan"], "--beta must be in (0, inf), got nan"),
        ("dpo.py", ["--label_smoothing", 0.6], "--label_smoothing must be in [0, 0.5)"),
        ("ppo.py", ["--batch_size", 0], "--batch_size must be in (0, inf)"),
        ("ppo.py", ["--kl_coef", -0.05], "--kl_coef must be in [0, inf)"),
        ("ppo.py", ["--lam", 1.5], "--lam must be in [0, 1]"),
        ("ppo.py", ["--max_grad_norm", "inf"], "--max_grad_norm must be in (0, inf), got inf"),
        ("reward.py", ["--num_normalisation_rows", 0], "--num_normalisation_rows must be in (0, inf)"),
        ("reward.py", ["--max_warmup_fraction", 2], "--max_warmup_fraction must be in [0, 1]"),
        ("rlaif.py", ["--rollout_temperature", 0], "--rollout_temperature must be in (0, inf)"),
        ("rloo.py", ["--grpo_eps", 0], "--grpo_eps must be in (0, inf)"),
        ("sl_cai.py", ["--num_revisions", 0], "--num_revisions must be in (0, inf)"),
        ("ppo.py", ["--gold_scorer", "data.gold:nothing"], "--gold_scorer 'data.gold:nothing' names no function"),
        ("reward.py", ["--gold_scorer", "no_such_module:score"], "names no function (module:function)"),
    ],
)
def test_arguments_out_of_range(script, args, words, tmp_path):
    """Checked before anything is loaded: no model or data is read, nothing is written."""
    assert words in run_inprocess(script, *args, "--output_dir", tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")


def test_every_labeller_question_too_long(bad, tmp_path):
    """Label mode writes no empty dataset, and online mode stops at the first update with nothing to learn from."""
    args = [*SCRIPTS["rlaif.py"](bad), "--judge_max_length", 10, "--output_dir", tmp_path / "o"]
    assert "train: every labeller question is over --judge_max_length 10" in run_inprocess(
        "rlaif.py", *args, "--mode", "label", "--dataset_name", f"{WORLD}/preference", "--max_label_rows", 4
    )
    assert "step 1: every labeller question" in run_inprocess(
        "rlaif.py",
        *args,
        "--dataset_name",
        f"{WORLD}/prompts",
        "--max_steps",
        1,
        "--batch_size",
        4,
        "--micro_batch_size",
        2,
        "--num_eval_prompts",
        4,
        "--response_length",
        8,
    )
    assert not os.path.exists(tmp_path / "o")


def test_reward_reads_its_normalisation_data_before_training(bad, tmp_path):
    message, stdout = run_inprocess(
        "reward.py",
        *SCRIPTS["reward.py"](bad),
        "--sft_dataset_name",
        bad["dir"] / "nope.jsonl",
        "--output_dir",
        tmp_path / "o",
        stdout=True,
    )
    assert "nope.jsonl" in message and "parameters" not in stdout  # the model is not even loaded
    assert not os.path.exists(tmp_path / "o")


def test_chat_responses_need_chat_prompts(bad, tmp_path):
    """A response given as chat messages after a text prompt, or a conversation of one message (no prompt)."""
    pref = read_jsonl(f"{WORLD}/preference/train.jsonl")[:40]

    def reply(text):
        return [{"role": "assistant", "content": text}]

    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "prompt": r["prompt"],
                "chosen": reply(r["chosen"]),
                "rejected": reply(r["rejected"]),
                "completion": reply(r["chosen"]),
            }
            for r in pref
        ],
    )
    single = write_jsonl(tmp_path / "single.jsonl", [{"messages": reply(r["chosen"])} for r in pref])
    for script, data in (("sft.py", mixed), ("reward.py", mixed), ("dpo.py", mixed), ("sft.py", single)):
        message = run_inprocess(script, *SCRIPTS[script](bad), "--dataset_name", data, "--output_dir", tmp_path / "o")
        assert "needs a conversational prompt" in message, message
        assert not os.path.exists(tmp_path / "o")


def test_wrong_heads(bad, tmp_path):
    assert "not a LlamaForCausalLM" in run_inprocess(
        "dpo.py", "--model_name_or_path", bad["rm"], "--output_dir", tmp_path / "o"
    )
    assert "not a LlamaForSequenceClassification" in run_inprocess(
        "ppo.py",
        "--model_name_or_path",
        bad["sft"],
        "--reward_model_name_or_path",
        bad["sft"],
        "--output_dir",
        tmp_path / "o",
    )
