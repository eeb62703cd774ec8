"""Shared test helpers: run a script as a user would, and a small SFT model trained once per session."""

import json
import os
import subprocess
import sys

import pytest

# offline, before any hub library is imported (they read these once): a hub name fails at once
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
# Under pytest-xdist (README's `-n 2`) every worker and every script it runs has one torch thread: more threads
# than cores make OpenMP's threads spin.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "data", "world")
sys.path.insert(0, ROOT)
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def run(script, *args, ok=True, timeout=600, env=None):
    """Run `python script args` from the repository root; return the CompletedProcess (text)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def one_line_error(proc, *words):
    """The process failed with a single 'error: ...' line naming the problem, and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
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
        return [json.loads(line) for line in f]


def made_once(tmp_path_factory, name, make):
    """make(directory) -> a JSON-able result, called once per test session: under pytest-xdist the first worker
    that needs it makes it in a directory all workers share, holding a lock; the others wait and read its result."""
    if not WORKER:
        return make(tmp_path_factory.mktemp(name))
    from filelock import FileLock  # a dependency of huggingface_hub

    shared = tmp_path_factory.getbasetemp().parent  # the session's directory, above each worker's own
    with FileLock(str(shared / f"{name}.lock")):
        done = shared / f"{name}.json"
        if done.is_file():
            return json.loads(done.read_text())
        (shared / name).mkdir(exist_ok=True)
        result = make(shared / name)
        done.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory):
    """The world's SFT policy, trained from scratch for 300 steps (~90 s): the start of every learning test."""

    def make(out):
        run("sft.py", "--output_dir", out / "sft", "--max_steps", 300, "--eval_every", 1000, "--num_eval_prompts", 128)
        return str(out / "sft")

    return made_once(tmp_path_factory, "sft_model", make)


def run_side_by_side(*commands: str):
    """Run several "script args" command lines at once, one torch thread each: on 2 cores two small trainings side
    by side finish sooner than one after the other with two threads each (tiny matrices parallelise poorly)."""
    env = dict(ENV, OMP_NUM_THREADS="1")
    procs = []
    for command in commands:
        script, *args = command.split()
        argv = [sys.executable, os.path.join(ROOT, script), *args]
        procs.append(
            (
                command,
                subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
            )
        )
    for command, proc in procs:
        stderr = proc.communicate(timeout=900)[1]
        if proc.returncode != 0:
            raise AssertionError(f"{command} failed ({proc.returncode}):\n{stderr[-4000:]}")


def world_subset(path, name, n_train, n_test):
    """A local dataset directory holding the first rows of the world's `name` splits (None: all of them)."""
    path.mkdir(exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        write_jsonl(path / f"{split}.jsonl", read_jsonl(f"{WORLD}/{name}/{split}.jsonl")[:n])
    return str(path)


@pytest.fixture(scope="session")
def small_sft(tmp_path_factory):
    """256 training and 32 held-out demonstrations of the world: quick runs whose evaluation costs little."""
    return world_subset(tmp_path_factory.mktemp("small_sft"), "sft", 256, 32)


@pytest.fixture(scope="session")
def preference_models(sft_model, tmp_path_factory):
    """The world's reward model (200 steps of 32 pairs), one trained on its rankings of 4 instead (100 steps of 32
    rankings, evaluated on the held-out pairs) and the DPO policy (120 steps), all from the session's SFT model,
    trained side by side."""
    return made_once(tmp_path_factory, "preference_models", lambda out: train_preference_models(sft_model, out))


def train_preference_models(sft_model, out):
    dpo_data = world_subset(out / "preference", "preference", None, 250)  # DPO evaluates on 250 held-out pairs
    # (reward.py's accuracy on all 1,000)
    run_side_by_side(
        f"reward.py --model_name_or_path {sft_model} --output_dir {out}/reward --max_steps 200 --batch_size 32 "
        "--micro_batch_size 32 --learning_rate 1e-3 --eval_every 1000 --num_eval_rows None",
        f"dpo.py --model_name_or_path {sft_model} --dataset_name {dpo_data} --output_dir {out}/dpo --max_steps 120 "
        "--eval_every 1000 --learning_rate 5e-5 --num_eval_prompts 128",
        f"reward.py --model_name_or_path {sft_model} --dataset_name {WORLD}/ranking --eval_dataset_name "
        f"{WORLD}/preference --output_dir {out}/reward_ranking --max_steps 100 --batch_size 32 --micro_batch_size 32 "
        "--learning_rate 1e-3 --eval_every 1000 --num_eval_rows None",
    )
    return {"reward": str(out / "reward"), "dpo": str(out / "dpo"), "reward_ranking": str(out / "reward_ranking")}


@pytest.fixture(scope="session")
def reward_model(preference_models):
    return preference_models["reward"]


@pytest.fixture(scope="session")
def online_runs(sft_model, reward_model, tmp_path_factory):
    """The learning runs of ppo.py (16 steps of 32 episodes, against the session's reward model), rloo.py (24 steps
    of 8 prompts x 4 responses) and rlaif.py (32 steps of 32 prompts, judged by the world's labeller
    data/world/judge_model), side by side. Twice the scripts' default learning rates (the runs have a quarter to
    a third of the defaults' steps) and 256 evaluation prompts: over seeds 0-3 the gold win rates were 0.71-0.72
    (PPO), 0.66-0.79 (RLOO) and 0.65-0.76 (RLAIF), with a binomial standard error of 0.03."""
    return made_once(tmp_path_factory, "online_runs", lambda out: train_online(sft_model, reward_model, out))


def train_online(sft_model, reward_model, out):
    policy = f"--model_name_or_path {sft_model} --num_eval_prompts 256 --eval_every 1000"
    run_side_by_side(
        f"ppo.py {policy} --reward_model_name_or_path {reward_model} --output_dir {out}/ppo --total_episodes 512 "
        "--batch_size 32 --micro_batch_size 32 --learning_rate 6e-5",
        f"rloo.py {policy} --reward_model_name_or_path {reward_model} --output_dir {out}/rloo --total_episodes 192 "
        "--batch_size 8 --micro_batch_size 8 --learning_rate 6e-5",
        f"rlaif.py {policy} --judge_model_name_or_path {WORLD}/judge_model --output_dir {out}/rlaif "
        "--total_episodes 1024 --batch_size 32 --micro_batch_size 32 --learning_rate 2e-4",
    )
    return {"ppo": str(out / "ppo"), "rloo": str(out / "rloo"), "rlaif": str(out / "rlaif")}
