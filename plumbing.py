"""Run plumbing no algorithm depends on: one-line errors and argument checks, loading models, device and precision,
FSDP2 wrapping, checkpoints and resume, atomic saves, tracking. A reader can skip this file; what the algorithms use
(tokens, log-probs, sampling, evaluation, the collectives, LoRA) is in common.py."""

import atexit
import importlib
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
import typing
from contextlib import nullcontext

import numpy as np
import torch

import common

DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
MADE_BY = {"runs/sft": "sft.py", "runs/reward": "reward.py"}  # the scripts' default inputs, and what writes them
CHECKPOINT = "checkpoint"  # the directory of checkpoints inside --output_dir
# the arguments a resumed run may set differently; any other change would make it another run
RESUME_MAY_CHANGE = ("resume", "output_dir", "save_every", "skip_nonfinite", "track", "wandb_project")


# ---- one-line errors and argument checks -------------------------------------------------------------
def fail(message: str):
    """End the run with one line naming the user's mistake: rank 0 says it (torchrun then stops the others); a
    mistake only another rank meets is said by that rank after a wait."""
    if common.RANK > 0:
        time.sleep(10)
        print(f"error (rank {common.RANK}): {message}", file=sys.__stderr__, flush=True)
        os._exit(1)
    sys.exit(f"error: {message}")


def describe(e: Exception) -> str:
    """An exception in one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def check_ranges(args, ranges: dict[str, str]):
    """Fail on the first argument outside its interval ({"(0, inf)": "batch_size beta", ...}; None means off). Every
    numeric field of the Args must be named exactly once, so a misspelt field raises at every run, not silently."""
    named = [(name, interval) for interval, names in ranges.items() for name in names.split()]
    hints = typing.get_type_hints(type(args))
    numeric = {n for n, t in hints.items() if {int, float} & {*typing.get_args(t), t} or typing.get_origin(t) is tuple}
    if sorted(name for name, _ in named) != sorted(numeric):
        raise TypeError(f"check_ranges names {[n for n, _ in named]}, not once each of the numeric fields {numeric}")
    for name, interval in named:
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        value = getattr(args, name)
        for v in [x for x in (value if isinstance(value, tuple) else (value,)) if x is not None]:
            inside = (lo < v if interval[0] == "(" else lo <= v) and (v < hi if interval[-1] == ")" else v <= hi)
            if not (math.isfinite(v) and inside):
                fail(f"--{name} must be in {interval}, got {value}")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_function(spec: str | None, what: str):
    """The function a "module:function" argument names (e.g. the offline world's "data.gold:score"), or None."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        fail(f"--{what} {spec!r} names no function (module:function): {describe(e)}")


def read_text(path: str, what: str) -> str:
    """A file's UTF-8 text, or one line naming what is wrong with it."""
    if not os.path.isfile(path):
        fail(f"{what} {does_not_exist(path)}")
    try:
        return open(path, encoding="utf-8").read()
    except UnicodeDecodeError as e:
        fail(f"{what} {path!r} is not UTF-8 text (byte {e.start})")


# ---- data --------------------------------------------------------------------------------------------
def is_local(name: str) -> bool:
    """A name that exists, or is written like a path (runs/ holds the scripts' outputs), is local; else a hub id."""
    first, path_like = name.split("/")[0], name.startswith((".", "/", "~", "runs/")) or name.endswith(DATA_EXTENSIONS)
    return os.path.exists(name) or path_like or name.count("/") > 1 or (first != name and os.path.isdir(first))


def does_not_exist(name: str) -> str:
    """ "'name' does not exist", and for a script's output, which script writes it."""
    made_by = MADE_BY.get(name.rstrip("/"))
    hint = f": `python {made_by}` writes it" if made_by else ": run the script that writes it first"
    return f"{name!r} does not exist" + (hint if name.startswith("runs/") else "")


# ---- models, device, precision -----------------------------------------------------------------------
def load_model(cls, name: str, tok, device, dtype=torch.float32, new_head=False, init_without_weights=False, **kwargs):
    """A transformers model (safetensors only, no hub code) whose embeddings fit the tokenizer, with the head of `cls`
    (an Auto class) or, with `new_head`, a fresh one; with `init_without_weights`, random weights for a config."""
    from safetensors import SafetensorError
    from transformers import AutoConfig

    if is_local(name) and not os.path.isfile(os.path.join(name, "config.json")):
        fail(f"{does_not_exist(name)}" if not os.path.exists(name) else f"{name!r} holds no config.json")
    try:
        config = AutoConfig.from_pretrained(name)
        expected = cls._model_mapping[type(config)].__name__ if type(config) in cls._model_mapping else cls.__name__
        if not new_head and expected not in (config.architectures or [expected]):
            fail(f"{name!r} holds a {(config.architectures or [config.model_type])[0]}, not a {expected}")
        if device.type == "cpu" and torch.backends.mkldnn.matmul.fp32_precision == "bf16":
            kwargs.setdefault("attn_implementation", "eager")  # with oneDNN's matmuls, faster than SDPA's CPU kernel
        no_weights = os.path.isdir(name) and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name))
        if init_without_weights and no_weights:
            print(f"note: {name} holds a config but no weights: initialising the model at random")
            model = cls.from_config(config).to(dtype)
        else:
            model = cls.from_pretrained(name, dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # a corrupt file is among them
        fail(f"could not load {cls.__name__} from {name!r}: {describe(e)}")
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))  # the new rows are the pad token's; tied weights stay tied
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device)


def device_and_autocast(bf16: bool | None = None, compile: bool | None = None, kernel_cache: int = 16):
    """(device, autocast context, compile?, bf16?): bf16 autocast and torch.compile on with CUDA, off on the CPU
    unless set. On the CPU, fp32 matmuls go to oneDNN where it keeps them fp32 (RLHF_CPU_MATMUL=mkl: torch's MKL)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16, compile = (device.type == "cuda" if x is None else x for x in (bf16, compile))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(kernel_cache))
        os.environ.setdefault("LRU_CACHE_CAPACITY", "4")
        onednn = os.environ.get("RLHF_CPU_MATMUL", "onednn") != "mkl"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16" if onednn else "none"  # "bf16": oneDNN may take them
        x = torch.full((64, 64), 1 + 2**-10)
        if abs((x @ x)[0, 0].item() - 64 * (1 + 2**-10) ** 2) > 1e-4:  # it rounds to bf16 here: back to MKL
            torch.backends.mkldnn.matmul.fp32_precision = "none"
    if common.DISTRIBUTED:  # join torchrun's processes (NCCL on GPUs, gloo on the CPU); only rank 0 prints
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # at exit the models still hold the group, so its worker threads outlive destroy_process_group; one that has
        # just finished the last collective still frees its tensors, which takes the GIL and, once the interpreter is
        # being torn down, aborts the process (pytorch/pytorch#179291): a moment's sleep lets it finish first
        atexit.register(lambda: (dist.destroy_process_group(), time.sleep(0.2)))
        if common.RANK > 0:  # tqdm's bars, notes and warnings once; the others' errors still reach the terminal
            sys.stdout = sys.stderr = open(os.devnull, "w")
            sys.excepthook = lambda *e: traceback.print_exception(*e, file=sys.__stderr__)
    onednn = " (fp32 matmuls by oneDNN)" * (torch.backends.mkldnn.matmul.fp32_precision == "bf16")
    where = f", {common.WORLD_SIZE} processes (FSDP2)" if common.DISTRIBUTED else ""
    print(
        f"note: {device.type}, {'bf16 autocast' if bf16 else 'fp32'}{onednn}, {'compiled' * compile or 'eager'}{where}"
    )
    return device, torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext(), compile, bf16


# ---- several processes: FSDP2 (the collectives the algorithms call are in common.py) ----------------------
def check_global_batch(batch_size: int):
    if batch_size % common.WORLD_SIZE:
        fail(f"--batch_size {batch_size} (the global batch) does not split evenly over {common.WORLD_SIZE} processes")


def shard_model(model):
    """FSDP2 under torchrun: each decoder layer (_no_split_modules) a unit gathered just before its forward and freed
    after, the rest one more (a classifier's backbone and head two); frozen models too. Gradients are summed over
    ranks, not averaged: each rank's loss is already its share of the step's."""
    if not common.DISTRIBUTED:
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=True)
    for unit in [model.base_model, model.score] if hasattr(model, "score") else [model]:
        fully_shard(unit, reshard_after_forward=True)
    for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
        if any(p.requires_grad for p in unit.parameters()):  # a plain sum (gloo has no pre-multiplied one)
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        with torch.inference_mode(False):  # the gathered weights' buffer is made at the first gather: not in a rollout
            unit.unshard()
            unit.reshard()
    return model


def full_state_dict(model):
    """Under torchrun, the whole model's weights gathered onto rank 0's CPU for saving (every rank calls it; the
    others get None), tied names sharing one tensor again; in one process None."""
    if not common.DISTRIBUTED:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if common.RANK > 0:
        return None
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for aliases in names.values():  # the state dict keeps one name of a shared parameter
        kept = next((a for a in aliases if a in weights), None)
        weights.update({a: weights[kept] for a in aliases} if kept else {})
    return weights


# ---- outputs, checkpoints, logs ------------------------------------------------------------------------
def save_model(model, directory: str, weights=None):
    """save_pretrained(directory); a LoRA model merged (common.merged_weights: plain transformers loads it), and its
    adapter with the heads' trained copies in directory/adapter, as peft writes them."""
    if getattr(model, "lora_config", None) is None:
        return model.save_pretrained(directory, state_dict=weights)
    from safetensors.torch import save_file

    model.save_pretrained(directory, state_dict=common.merged_weights(model, weights))
    weights = model.state_dict() if weights is None else weights
    adapter = {
        "base_model.model." + name.replace(".modules_to_save.default.", ".").replace(".default.", "."): w.contiguous()
        for name, w in weights.items()
        if ".lora_" in name or ".modules_to_save." in name
    }
    os.makedirs(os.path.join(directory, "adapter"))
    model.lora_config.base_model_name_or_path = model.name_or_path
    model.lora_config.save_pretrained(os.path.join(directory, "adapter"))
    save_file(adapter, os.path.join(directory, "adapter", "adapter_model.safetensors"))


def check_output_dir(args, script: str):
    """Refuse to overwrite what is not a run of this script; with --resume, require its checkpoint and arguments."""
    output_dir, checkpoint = args.output_dir, os.path.join(args.output_dir, CHECKPOINT)

    def run_info(directory: str) -> dict:  # the run.json a script wrote there ({"script", "args"}), or {}
        try:
            return dict(json.load(open(os.path.join(directory, "run.json"), encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return {}

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        fail(f"--output_dir {output_dir!r} is a file")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        previous = run_info(output_dir).get("script") or run_info(checkpoint).get("script")
        if previous != script:
            what = f"the output of {previous}" if previous else "files that no run of this project wrote"
            fail(f"--output_dir {output_dir!r} already holds {what}; choose another directory or remove it")
    if getattr(args, "resume", False):  # a script without checkpoints has no --resume
        saved = run_info(checkpoint).get("args")
        if not os.path.isfile(os.path.join(checkpoint, "state.pt")) or not isinstance(saved, dict):
            fail(f"--resume: no checkpoint in {output_dir!r} (write them with --save_every)")
        now = json.loads(json.dumps(vars(args), default=str))  # as run.json holds them
        changed = {k: v for k, v in now.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v}
        if changed:
            changes = ", ".join(f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in changed.items())
            fail(f"--resume with other arguments than the checkpoint's run: {changes}")


def write_atomic(target: str, script: str, args, write, write_shards=None):
    """write(tmp) fills a temporary directory that then takes target's place by renames: never half of one. Every
    rank calls it: write_shards(tmp) (a sharded save is a collective) runs on every rank, write(tmp) on rank 0."""
    target = target.rstrip("/")
    pid = common.gather([os.getpid()])[0]  # rank 0's: one directory for all ranks
    tmp, old = f"{target}.tmp-{pid}", f"{target}.old-{pid}"
    if common.RANK == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    common.barrier()
    if write_shards is not None:
        write_shards(tmp)
    if common.RANK == 0:
        write(tmp)
        write_json(os.path.join(tmp, "run.json"), {"script": script, "args": vars(args)})
        if os.path.exists(target):
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    common.barrier()


def save_checkpoint(output_dir: str, script: str, args, models: dict, optimizer, scheduler, state: dict):
    """All a run needs to continue as if never stopped: weights and optimizer state (torch.distributed.checkpoint:
    each rank writes its own shards), the scheduler, every rank's RNGs and the script's `state`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    shards = dict(zip(("models", "optimizer"), get_state_dict(torch.nn.ModuleDict(models), optimizer), strict=True))
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None  # sampling on the GPU draws here
    rngs = common.gather([{"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "cuda_rng": cuda_rng}])
    state = {"scheduler": scheduler.state_dict() if scheduler else None, "rngs": rngs, **state}
    write_atomic(
        os.path.join(output_dir, CHECKPOINT),
        script,
        args,
        write=lambda tmp: torch.save(state, os.path.join(tmp, "state.pt")),
        write_shards=lambda tmp: dcp.save(shards, checkpoint_id=os.path.join(tmp, "shards")),
    )


def load_checkpoint(output_dir: str, models: dict, optimizer, scheduler) -> dict:
    """Restore what save_checkpoint wrote; return the script's own state (tensors only: weights_only=True)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path, modules = os.path.join(output_dir, CHECKPOINT), torch.nn.ModuleDict(models)
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    rngs = state.pop("rngs")
    if len(rngs) != common.WORLD_SIZE:  # each rank continues its own random streams
        fail(f"--resume: the checkpoint was written by {len(rngs)} processes, this run has {common.WORLD_SIZE}")
    shards = dict(zip(("models", "optimizer"), get_state_dict(modules, optimizer), strict=True))
    dcp.load(shards, checkpoint_id=os.path.join(path, "shards"))
    set_state_dict(modules, optimizer, model_state_dict=shards["models"], optim_state_dict=shards["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rngs[common.RANK]["torch_rng"])
    random.setstate(rngs[common.RANK]["python_rng"])
    if rngs[common.RANK]["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rngs[common.RANK]["cuda_rng"])
    print(f"resumed from {path} at step {state.get('step')}")
    return state


def finite_or_stop(value: torch.Tensor, what: str, step: int, skip: bool) -> bool:
    """True when `value` is finite on every rank; else stop, naming the step, before anything more is saved (or,
    with skip, False: every rank skips alike)."""
    if bool(torch.isfinite(common.reduce_sum(value.detach().float().sum()))):  # inf or nan on any rank makes it so
        return True
    if not skip:
        print(file=sys.stderr)  # end the progress bar's line, so the error is a line of its own
        intact = "the last checkpoint and output are intact; --skip_nonfinite skips such batches"
        fail(f"non-finite {what} at step {step}; stopped before saving anything more ({intact})")
    print(f"note: non-finite {what} at step {step}: batch skipped (--skip_nonfinite)")
    return False


def start_tracking(args, script: str):
    """(log, history): log(metrics, step) appends to history (metrics.jsonl), and to wandb only with --track."""
    history, wandb = [], None
    if args.track and common.RANK == 0:
        import wandb

        wandb.init(project=args.wandb_project, name=f"{script}__{args.seed}__{int(time.time())}", config=vars(args))

    def log(metrics: dict, step: int):
        history.append({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        if wandb is not None:
            wandb.log(metrics, step=step)

    return log, history


def write_jsonl(path: str, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
