"""Several processes: every script under `torchrun --nproc_per_node 2` on the CPU (gloo), against one process."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import ppo
from conftest import ENV, ROOT, WORLD, read_jsonl, run, world_subset

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(script, *args, ok=True, timeout=600):
    """`torchrun --nproc_per_node 2 script args` from the repository root; the CompletedProcess (text)."""
    argv = [*TORCHRUN, os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def max_difference(a, b):
    wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


# Two ranks with micro-batch m against one process with micro-batch 2m: the same rows, the same step. What
# differs is the order of the fp32 sums (each rank sums its half, then the ranks' gradients are added), about
# 1e-7 of a weight after 3 steps: one process with micro-batch 4 or 8 differs from itself as much (measured
# 1.3e-7, against 2.4e-7 across ranks). A step that averaged the ranks' gradients instead, or left a share out,
# moves weights by about a learning rate (2e-3 here: measured 1.7e-3), so 2e-5 tells the two apart.
TOLERANCE = 2e-5


def test_sft_on_two_ranks_takes_the_steps_of_one_process(small_sft, tmp_path):
    args = ["--dataset_name", small_sft, "--max_steps", 3, "--batch_size", 8, "--eval_every", 1000]
    args += ["--num_eval_prompts", 4, "--max_new_tokens", 4]
    run("sft.py", "--output_dir", tmp_path / "one", *args, "--micro_batch_size", 4)
    proc = torchrun("sft.py", "--output_dir", tmp_path / "two", *args, "--micro_batch_size", 2)
    assert "2 processes (FSDP2)" in proc.stdout
    assert proc.stdout.count("saved ") == 1  # only rank 0 prints
    assert max_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE
    # the held-out loss covers every held-out row once, on either count of processes
    one, two = (read_jsonl(tmp_path / d / "metrics.jsonl")[-1]["eval/loss"] for d in ("one", "two"))
    assert one == pytest.approx(two, rel=1e-5)
    # a plain transformers model, with its tied embeddings written once
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(tmp_path / "two" / "model.safetensors")


def test_dpo_and_reward_on_two_ranks_take_the_steps_of_one_process(sft_model, tmp_path):
    prefs = world_subset(tmp_path / "prefs", "preference", 64, 10)
    common_args = ["--model_name_or_path", sft_model, "--dataset_name", prefs, "--max_steps", 3, "--batch_size", 8]
    dpo_args = [*common_args, "--learning_rate", 2e-3, "--eval_every", 1000, "--num_eval_prompts", 4]
    dpo_args += ["--max_new_tokens", 4]
    reward_args = [*common_args, "--learning_rate", 2e-3, "--eval_every", 1000, "--num_normalisation_rows", 40]
    run("dpo.py", "--output_dir", tmp_path / "dpo_one", *dpo_args, "--micro_batch_size", 4)
    torchrun("dpo.py", "--output_dir", tmp_path / "dpo_two", *dpo_args, "--micro_batch_size", 2)
    assert max_difference(tmp_path / "dpo_one", tmp_path / "dpo_two") < TOLERANCE
    run("reward.py", "--output_dir", tmp_path / "rm_one", *reward_args, "--micro_batch_size", 4)
    torchrun("reward.py", "--output_dir", tmp_path / "rm_two", *reward_args, "--micro_batch_size", 2)
    assert max_difference(tmp_path / "rm_one", tmp_path / "rm_two") < TOLERANCE
    for name in ("dpo", "rm"):  # held-out pair metrics: each pair once, one number (a pair counted twice or left
        # out would move the mean loss by about 1e-2; a pair whose two rewards are within rounding may flip)
        one, two = (read_jsonl(tmp_path / f"{name}_{n}" / "metrics.jsonl")[-1] for n in ("one", "two"))
        assert one["eval/loss"] == pytest.approx(two["eval/loss"], rel=1e-4)
        assert one["eval/rewards/accuracies"] == pytest.approx(two["eval/rewards/accuracies"], abs=0.1 + 1e-9)
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm_two")


def test_kto_on_two_ranks_takes_the_steps_of_one_process_with_its_z0(sft_model, tmp_path):
    """z0 is the whole batch's, over both ranks: the same as one process's at every step, and so are the steps. The
    reference is another model (the world's labeller), so that z0 is not the clamp's 0 (as it is from the SFT model
    itself at step 1)."""
    thumbs = world_subset(tmp_path / "thumbs", "binary", 64, 10)
    args = ["--model_name_or_path", sft_model, "--ref_model_name_or_path", f"{WORLD}/judge_model"]
    args += ["--dataset_name", thumbs, "--max_steps", 3, "--batch_size", 8, "--learning_rate", 2e-3]
    args += ["--eval_every", 2, "--log_every", 1, "--num_eval_prompts", 4, "--max_new_tokens", 4]
    run("kto.py", "--output_dir", tmp_path / "one", *args, "--micro_batch_size", 4)
    torchrun("kto.py", "--output_dir", tmp_path / "two", *args, "--micro_batch_size", 2)
    assert max_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE
    one, two = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    z0 = [[m["kl"] for m in metrics if "kl" in m] for metrics in (one, two)]  # each step's
    assert len(z0[0]) == 3 and z0[1] == pytest.approx(z0[0], rel=1e-4, abs=1e-6)
    assert min(z0[0]) > 1  # never the clamp's 0
    for key in ("eval/kl", "eval/loss"):  # the held-out rows' z0 and loss: each row once
        assert one[-1][key] == pytest.approx(two[-1][key], rel=1e-4)


WHITEN = """
import sys, torch
sys.path.insert(0, {root!r})
import common, plumbing, ppo
plumbing.device_and_autocast()
x, mask = torch.load({batch!r})
share = slice(0, 3) if common.RANK == 0 else slice(3, 8)  # unequal shares, unequal numbers of real tokens
torch.save(ppo.masked_whiten(x[share], mask[share]), {out!r} + str(common.RANK))
"""


def test_masked_whitening_over_two_ranks_equals_one_process(tmp_path):
    torch.manual_seed(0)
    x, mask = torch.randn(8, 6) * 3 + 1, (torch.rand(8, 6) > 0.3).float()
    torch.save((x, mask), tmp_path / "batch.pt")
    script = tmp_path / "whiten.py"
    script.write_text(WHITEN.format(root=ROOT, batch=str(tmp_path / "batch.pt"), out=str(tmp_path / "white")))
    proc = subprocess.run([*TORCHRUN, str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.cat([torch.load(tmp_path / f"white{r}") for r in (0, 1)])
    one = ppo.masked_whiten(x, mask)  # no torchrun here: the whole batch in one process
    torch.testing.assert_close(two * mask, one * mask, rtol=1e-5, atol=1e-6)
    assert float((one * mask).sum()) == pytest.approx(0, abs=1e-4)  # whitened: mean 0 over the real tokens


def children(pid):
    """The processes whose parent is pid (from /proc)."""
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except OSError:  # gone meanwhile
            pass
    return kids


def kill_after_first_checkpoint(script, out, *args):
    """Start a 2-rank run and SIGKILL both ranks and torchrun once the first checkpoint exists; its step."""
    argv = [*TORCHRUN, os.path.join(ROOT, script), "--output_dir", str(out), *map(str, args)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(out, "checkpoint", "state.pt")
    deadline = time.time() + 300
    while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = children(proc.pid)  # torchrun starts the ranks in sessions of their own: killed one by one
    for pid in [*workers, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) >= 2  # both ranks (and whatever else torchrun started)
    assert os.path.exists(state), "the run ended before writing a checkpoint"
    assert not os.path.exists(os.path.join(out, "model.safetensors")), "killed too late: the run had finished"
    return torch.load(state, weights_only=True)["step"]


def assert_same_weights(a, b):
    wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit for bit: the same ranks, the same order of sums


ONLINE = ["--max_steps", 4, "--batch_size", 8, "--micro_batch_size", 2, "--response_length", 8]
ONLINE += ["--num_eval_prompts", 6, "--eval_every", 2, "--save_every", 2]


def test_ppo_on_two_ranks_end_to_end_and_killed_and_resumed(sft_model, reward_model, tmp_path):
    args = ["--model_name_or_path", sft_model, "--reward_model_name_or_path", reward_model, *ONLINE]
    args += ["--num_mini_batches", 2]
    torchrun("ppo.py", "--output_dir", tmp_path / "straight", *args)
    assert kill_after_first_checkpoint("ppo.py", tmp_path / "killed", *args) == 2
    # a checkpoint of 2 processes resumes under torchrun only
    one = run("ppo.py", "--output_dir", tmp_path / "killed", *args, "--resume", ok=False)
    assert "written by 2 processes" in one.stderr
    torchrun("ppo.py", "--output_dir", tmp_path / "killed", *args, "--resume")
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    assert_same_weights(tmp_path / "straight" / "value_model", tmp_path / "killed" / "value_model")
    curves = [read_jsonl(tmp_path / d / "curve.jsonl") for d in ("straight", "killed")]
    assert curves[0] == curves[1]
    assert len(read_jsonl(tmp_path / "straight" / "samples.jsonl")) == 6  # each held-out prompt once
    AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "straight" / "value_model")


def test_rlaif_on_two_ranks_end_to_end_and_killed_and_resumed(sft_model, tmp_path):
    args = ["--model_name_or_path", sft_model, "--judge_model_name_or_path", f"{WORLD}/judge_model", *ONLINE]
    torchrun("rlaif.py", "--output_dir", tmp_path / "straight", *args)
    assert kill_after_first_checkpoint("rlaif.py", tmp_path / "killed", *args) == 2
    torchrun("rlaif.py", "--output_dir", tmp_path / "killed", *args, "--resume")
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    metrics = [read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("straight", "killed")]
    assert [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics[0]] == [
        {k: v for k, v in m.items() if "seconds" not in k} for m in metrics[1]
    ]
    AutoModelForCausalLM.from_pretrained(tmp_path / "straight")


def test_rloo_on_two_ranks_end_to_end(sft_model, reward_model, tmp_path):
    args = ["--model_name_or_path", sft_model, "--reward_model_name_or_path", reward_model, "--max_steps", 2]
    args += ["--batch_size", 4, "--micro_batch_size", 1, "--num_mini_batches", 2, "--response_length", 8]
    args += ["--num_eval_prompts", 5, "--eval_every", 1000]
    torchrun("rloo.py", "--output_dir", tmp_path / "out", *args)
    assert len(read_jsonl(tmp_path / "out" / "samples.jsonl")) == 5
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # 4 prompts, 2 minibatches, 2 ranks: one prompt a micro-batch, no more
    bad = ["--model_name_or_path", sft_model, "--batch_size", 4, "--micro_batch_size", 2, "--num_mini_batches", 2]
    proc = torchrun("rloo.py", "--output_dir", tmp_path / "bad", *bad, ok=False)
    assert "error: batch_size 4 must split" in proc.stderr and "over 2 processes" in proc.stderr


def test_a_mistake_under_torchrun_is_one_line_once_and_no_rank_hangs(tmp_path):
    started = time.time()
    proc = torchrun("sft.py", "--output_dir", tmp_path / "out", "--dataset_name", tmp_path / "missing.jsonl", ok=False)
    errors = [line for line in proc.stderr.splitlines() if "error" in line and "missing.jsonl" in line]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: dataset")
    assert "[rank" not in proc.stderr  # no worker's traceback
    proc = torchrun("sft.py", "--output_dir", tmp_path / "out", "--batch_size", 7, ok=False)
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        "error: --batch_size 7 (the global batch) does not split evenly over 2 processes"
    ]
    assert time.time() - started < 120
    assert not os.path.exists(tmp_path / "out")


def test_every_rank_samples_its_own_prompts_with_its_own_seed(sft_model, tmp_path):
    """Detail 16: with the same seed, the ranks' samples of the same prompt differ; evaluation gathers them in
    prompt order."""
    prompts = [{"prompt": "I saw The Iron Circus at the cinema."}] * 6
    data = tmp_path / "prompts"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(f'{{"prompt": "{p["prompt"]}"}}\n' for p in prompts))
    args = ["--model_name_or_path", sft_model, "--dataset_name", data, "--max_steps", 1, "--batch_size", 2]
    args += ["--micro_batch_size", 1, "--response_length", 8, "--num_eval_prompts", 6, "--eval_every", 1000]
    args += ["--judge_model_name_or_path", f"{WORLD}/judge_model", "--learning_rate", 1e-12]
    torchrun("rlaif.py", "--output_dir", tmp_path / "out", *args)
    samples = [s["response"] for s in read_jsonl(tmp_path / "out" / "samples.jsonl")]
    assert len(samples) == 6
    assert samples[:3] != samples[3:]  # rank 0's three, then rank 1's: other seeds, other samples
    assert np.isfinite(read_jsonl(tmp_path / "out" / "metrics.jsonl")[-1]["eval/kl_to_ref"])


def test_lora_dpo_on_two_ranks_takes_the_steps_of_one_process(sft_model, tmp_path):
    """FSDP2 shards the frozen base and the adapters alike (each decoder layer one unit): the same step as one
    process, the merged output and the adapter both written by rank 0."""
    prefs = world_subset(tmp_path / "prefs", "preference", 64, 10)
    args = ["--model_name_or_path", sft_model, "--dataset_name", prefs, "--max_steps", 3, "--batch_size", 8]
    args += ["--learning_rate", 2e-3, "--eval_every", 1000, "--num_eval_prompts", 4, "--max_new_tokens", 4]
    args += ["--lora_r", 8, "--log_every", 1]
    run("dpo.py", "--output_dir", tmp_path / "one", *args, "--micro_batch_size", 4)
    torchrun("dpo.py", "--output_dir", tmp_path / "two", *args, "--micro_batch_size", 2)
    assert max_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE
    adapters = [load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    assert max(float((adapters[0][k] - adapters[1][k]).abs().max()) for k in adapters[0]) < TOLERANCE
    first = read_jsonl(tmp_path / "two" / "metrics.jsonl")[0]
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)  # the reference: the policy, its adapters off


def test_two_nodes_of_one_process_take_the_steps_of_one_node_of_two(small_sft, tmp_path):
    """The README's multi-node command, as two launchers on this machine (--nnodes 2, one process each, meeting
    through the c10d rendezvous on localhost): the same weights as one node with two processes."""
    args = ["--dataset_name", small_sft, "--max_steps", 3, "--batch_size", 8, "--micro_batch_size", 2]
    args += ["--eval_every", 1000, "--num_eval_prompts", 4, "--max_new_tokens", 4]
    torchrun("sft.py", "--output_dir", tmp_path / "one_node", *args)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    launcher += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "two_nodes"]
    script = [os.path.join(ROOT, "sft.py"), "--output_dir", str(tmp_path / "two_nodes"), *map(str, args)]
    nodes = [subprocess.Popen([*launcher, *script], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    assert sum(out.count("saved ") for out, _ in outputs) == 1  # one rank 0 in all
    assert_same_weights(tmp_path / "one_node", tmp_path / "two_nodes")
