"""Shared test helpers: run a script as a user would, and a small SFT model trained once per session."""
import json
import os
import subprocess
import sys

import pytest

# offline, before any hub library is imported (they read these once): a hub name fails at once
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "data", "world")
sys.path.insert(0, ROOT)
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def run(script, *args, ok=True, timeout=600):
    """Run `python script args` from the repository root; return the CompletedProcess (text)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def one_line_error(proc, *words):
    """The process failed with a single 'error: ...' line naming the problem, and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f]


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory):
    """The world's SFT policy, trained from scratch for 300 steps (~90 s): the start of every learning test."""
    out = tmp_path_factory.mktemp("chain") / "sft"
    run("sft.py", "--output_dir", out, "--max_steps", 300, "--eval_every", 1000, "--num_eval_samples", 128)
    return str(out)


@pytest.fixture(scope="session")
def reward_model(sft_model, tmp_path_factory):
    """The world's reward model, trained for 200 steps of 32 pairs on top of the session's SFT model."""
    out = tmp_path_factory.mktemp("chain") / "reward"
    run("reward.py", "--model_name_or_path", sft_model, "--output_dir", out, "--max_steps", 200,
        "--batch_size", 32, "--micro_batch_size", 32, "--learning_rate", 1e-3, "--eval_every", 1000)
    return str(out)
