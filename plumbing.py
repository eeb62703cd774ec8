"""Run plumbing that every script shares and no algorithm depends on: one-line errors, argument checks, data
and model loading, device and precision, several processes (torchrun, FSDP2), checkpoints and resume, atomic
saves, tracking. A reader can skip this file; the language-model helpers the algorithms use are in common.py."""

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
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
CHECKPOINT = "checkpoint"  # the directory of checkpoints inside --output_dir
# the arguments a resumed run may set differently; any other change would make it another run
RESUME_MAY_CHANGE = ("resume", "output_dir", "save_every", "skip_nonfinite", "track", "wandb_project")
# torchrun sets these for each process it starts; `python script.py` is one process (rank 0 of 1) and then
# nothing below touches torch.distributed
DISTRIBUTED = "RANK" in os.environ and "WORLD_SIZE" in os.environ
RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---- one-line errors and argument checks -------------------------------------------------------------
def fail(message: str):
    """A user's mistake ends the run with one line naming it, not a traceback. Under torchrun every rank meets
    the same mistake and rank 0 says it; torchrun then stops the other ranks. Only a mistake that no other rank
    meets outlives the wait below, and is then said by its rank."""
    if RANK > 0:
        time.sleep(10)
        print(f"error (rank {RANK}): {message}", file=sys.__stderr__, flush=True)
        os._exit(1)
    sys.exit(f"error: {message}")


def describe(e: Exception) -> str:
    """An exception in one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def check_positive(args, names: str):
    """One line naming the first of these arguments (space-separated) that is not above 0, before any loading."""
    for name in names.split():
        value = getattr(args, name)
        if value is not None and not value > 0:
            fail(f"--{name} must be greater than 0, got {value}")


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


# ---- data --------------------------------------------------------------------------------------------
def is_local(name: str) -> bool:
    """A name that exists, or is written like a path, is local; anything else is a hub id."""
    first, path_like = name.split("/")[0], name.startswith((".", "/", "~")) or name.endswith(DATA_EXTENSIONS)
    return os.path.exists(name) or path_like or name.count("/") > 1 or (first != name and os.path.isdir(first))


def read_json_rows(path: str) -> list[dict]:
    """The rows of a .jsonl file (one object per line) or a .json file (a list of objects, or lines)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text) if path.endswith(".json") else None
    except json.JSONDecodeError:
        rows = None  # JSON Lines under a .json name, as `datasets` also reads them
    if rows is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                fail(f"dataset {path!r}, line {n}: not JSON ({e.msg})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        fail(f"dataset {path!r} must hold one JSON object per row")
    return rows


def json_splits(name: str):
    """{split: rows} of a .json/.jsonl file (all "train") or a directory of train/test/validation .json(l) files,
    read with the json module (importing `datasets` pulls in pyarrow and pandas: benchmarks/README.md); else None."""
    if os.path.isfile(name):
        return {"train": read_json_rows(name)} if name.endswith((".json", ".jsonl")) else None
    if not os.path.isdir(name):
        return None
    files = [f for f in os.listdir(name) if not f.startswith(".") and f != "README.md"]
    splits = {os.path.splitext(f)[0]: f for f in files if f.endswith((".json", ".jsonl"))}
    if not files or len(splits) < len(files) or not set(splits) <= {"train", "test", "validation"}:
        return None
    return {split: read_json_rows(os.path.join(name, f)) for split, f in splits.items()}


def load_splits(name: str, columns: list[list[str]], eval_fraction: float = 0.05, seed: int = 0):
    """(train rows, eval rows, column set) of a hub dataset, a local directory or a .json/.jsonl file.

    `columns` lists the accepted column sets; the first one the data has is returned. The eval split is "test"
    or "validation" when there is one, else a seeded `eval_fraction` of train (the rows `datasets`'
    train_test_split would hold out)."""
    if is_local(name) and not os.path.exists(name):
        fail(f"dataset {name!r} does not exist")
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        fail(f"dataset {name!r} is empty")
    splits = json_splits(name)
    if splits is None:
        from datasets import load_dataset

        ext = os.path.splitext(name)[1].lstrip(".")  # a local csv, parquet or txt file: its builder and the file
        builder, files = ({"txt": "text"}.get(ext, ext), name) if os.path.isfile(name) else (name, None)
        try:
            ds = load_dataset(builder, data_files=files)
        except Exception as e:  # the datasets library raises many types; the first line says what went wrong
            where = "" if is_local(name) else " (a hub id: is the machine offline? HF_HUB_OFFLINE=1 fails fast)"
            fail(f"could not load dataset {name!r}{where}: {describe(e)}")
        splits = {split: ds[split].to_list() for split in ds}
    if "train" not in splits:
        fail(f"dataset {name!r} has no 'train' split (it has {list(splits)})")
    train = splits["train"]
    if not train:
        fail(f"dataset {name!r} is empty")
    names = list(dict.fromkeys(k for row in train for k in row))
    found = next((c for c in columns if set(c) <= set(names)), None)
    if found is None:
        expected = " or ".join("{" + ", ".join(c) + "}" for c in columns)
        fail(f"dataset {name!r} has columns {names}; expected one of {expected}")
    eval_name = next((s for s in ("test", "validation") if splits.get(s)), None)
    for split in filter(None, ("train", eval_name)):  # a row without a column of the set
        missing = next(((i, c) for i, row in enumerate(splits[split]) for c in found if row.get(c) is None), None)
        if missing:
            fail(f"dataset {name!r}: row {missing[0]} of {split} has no {missing[1]!r}")
    if eval_name:
        return train, splits[eval_name], found
    if len(train) < 2:
        fail(f"dataset {name!r} has {len(train)} row and no test split: nothing to hold out")
    order = np.random.default_rng(seed).permutation(len(train))
    n_eval = math.ceil(eval_fraction * len(train))
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]], found


# ---- models, device, precision -----------------------------------------------------------------------
def load_model(cls, name: str, tok, device, dtype=torch.float32, new_head=False, init_without_weights=False, **kwargs):
    """A transformers model (safetensors only, no code from the hub) whose embeddings fit the tokenizer, with the
    head `cls` (an Auto class) builds for its config, unless `new_head` allows a fresh one. A local directory with
    a config but no weights gives a randomly initialised model where `init_without_weights` allows it."""
    from transformers import AutoConfig

    if is_local(name) and not os.path.isfile(os.path.join(name, "config.json")):
        fail(f"{name!r} holds no config.json: not a model directory")
    try:
        config = AutoConfig.from_pretrained(name)
        if type(config) not in cls._model_mapping:
            fail(f"{name!r} is a {config.model_type} model, for which transformers has no {cls.__name__}")
        expected, architectures = cls._model_mapping[type(config)].__name__, config.architectures or []
        if architectures and not new_head and expected not in architectures:
            fail(f"{name!r} holds a {architectures[0]}, not a {expected}")
        if device.type == "cpu" and torch.backends.mkldnn.matmul.fp32_precision == "bf16":
            kwargs.setdefault("attn_implementation", "eager")  # with oneDNN matmuls, faster than SDPA's CPU kernel
        no_weights = os.path.isdir(name) and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name))
        if init_without_weights and no_weights:
            print(f"note: {name} holds a config but no weights: initialising the model at random")
            model = cls.from_config(config).to(dtype)
        else:
            model = cls.from_pretrained(name, dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        fail(f"could not load {cls.__name__} from {name!r}: {describe(e)}")
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))  # the new rows are the pad token's; tied weights stay tied
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device)


def device_and_autocast(bf16: bool | None = None, compile: bool | None = None, kernel_cache: int = 16):
    """(device, autocast context, compile?, bf16?). bf16 autocast and torch.compile default (None) to on with CUDA
    and off on the CPU; either is honoured on the CPU when asked for (bf16 is fast only where the CPU has bf16
    instructions). The CPU's fp32 matmuls go to oneDNN instead of MKL (slow on some AMD CPUs) where oneDNN still
    computes them in fp32: a product that bf16 would round (1 + 2^-10) checks it. oneDNN caches a kernel per
    matmul shape: `kernel_cache` entries suit a training step; scripts that also sample keep more."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16, compile = (device.type == "cuda" if x is None else x for x in (bf16, compile))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(kernel_cache))
        os.environ.setdefault("LRU_CACHE_CAPACITY", "4")
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        x = torch.full((64, 64), 1 + 2**-10)
        if abs((x @ x)[0, 0].item() - 64 * (1 + 2**-10) ** 2) > 1e-4:  # bf16 gives 64.0, fp32 64.125
            torch.backends.mkldnn.matmul.fp32_precision = "none"
    if DISTRIBUTED:
        device = start_processes(device)
    onednn = " (fp32 matmuls by oneDNN)" * (torch.backends.mkldnn.matmul.fp32_precision == "bf16")
    where = f", {WORLD_SIZE} processes (FSDP2)" if DISTRIBUTED else ""
    mode = f"{'bf16 autocast' if bf16 else 'fp32'}{onednn}, {'compiled' if compile else 'eager'}{where}"
    print(f"note: {device.type}, {mode}")
    return device, torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext(), compile, bf16


# ---- several processes: torchrun and FSDP2 -----------------------------------------------------------
# Under `torchrun --nproc_per_node N`, every rank runs the whole script. The trained models' parameters,
# gradients and AdamW state are sharded over the ranks (FSDP2); each rank takes its share of every batch, and
# whatever reduces over a batch reduces over all ranks. Without torchrun each helper below is the identity.
def start_processes(device):
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); the rank's device. Only rank 0 prints:
    the others' output is dropped, except errors (fail, and tracebacks) which still reach the terminal."""
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    if RANK > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # tqdm's bars, notes and warnings: once, by rank 0
        sys.excepthook = lambda *e: traceback.print_exception(*e, file=sys.__stderr__)
    return device


def check_global_batch(batch_size: int):
    """A global batch size must split evenly over the ranks."""
    if batch_size % WORLD_SIZE:
        fail(f"--batch_size {batch_size} (the global batch) does not split evenly over {WORLD_SIZE} processes")


def seed_sampling(seed: int):
    """Detail 16: each rank draws its own samples, from seed + rank * 100003. Called after the models are made,
    so that every rank initialises them alike; one process keeps its seed's stream untouched."""
    if DISTRIBUTED:
        torch.manual_seed(seed + RANK * 100003)


def shard_model(model):
    """FSDP2 under torchrun: every decoder layer (the classes transformers names in _no_split_modules) is a unit
    whose parameters are all-gathered just before its forward and freed after; the rest is one more unit (a
    sequence classifier's backbone and score head two: the scripts also call them apart). Frozen models are
    sharded too: at 7B a replicated fp32 reference and bf16 reward model would take 42 GB of every GPU, sharded
    42 / N. A trained model's gradients are summed over ranks, not averaged: each rank's loss is already its
    share of the step's loss (sums divided by the global batch's counts), so N ranks with micro-batch m take the
    step one process takes with micro-batch N * m."""
    if not DISTRIBUTED:
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=True)
    for unit in [model.base_model, model.score] if hasattr(model, "score") else [model]:
        fully_shard(unit, reshard_after_forward=True)
    for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
        if any(p.requires_grad for p in unit.parameters()):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
        # FSDP makes a unit's buffer for its gathered weights at the first gather and reuses it: made under
        # torch.inference_mode (a rollout), it could not be written to by a training forward
        with torch.inference_mode(False):
            unit.unshard()
            unit.reshard()
    return model


@contextmanager
def gathered(*models):
    """Whole models on every rank for the block (sampling): their forward passes then need no other rank, so each
    rank can stop sampling when its own rows are done. Without torchrun, nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)] if DISTRIBUTED else []
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def shard(items: list) -> list:
    """This rank's share of `items`: contiguous and of equal size on every rank (the last shares are topped up
    with copies of the last item), so every rank runs as many forward passes: a sharded forward is a collective.
    gather(results)[: len(items)] puts per-item results back in order, without the copies."""
    k = -(-len(items) // WORLD_SIZE)
    part = list(items[RANK * k : (RANK + 1) * k])
    return part + list(items[-1:]) * (k - len(part))


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not DISTRIBUTED:
        return list(items)
    import torch.distributed as dist

    parts = [None] * WORLD_SIZE
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over ranks (x itself in one process)."""
    if not DISTRIBUTED:
        return x
    import torch.distributed as dist

    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm (over all ranks' shards); the norm before clipping, a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's whole value on every rank (every rank must call it); x itself in one process."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def assign(param: torch.Tensor, value: torch.Tensor):
    """Set a parameter, sharded or not, to `value`, the whole tensor (the same on every rank)."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        param.copy_(value)


def full_state_dict(model):
    """For save_pretrained(state_dict=...): under torchrun, the whole model's weights gathered from the shards
    onto rank 0's CPU (every rank must call it; the others get None), with tied names sharing one tensor again
    so that it is written once. In one process None: save_pretrained reads the model itself."""
    if not DISTRIBUTED:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if RANK > 0:
        return None
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for aliases in names.values():  # the state dict keeps one name of a shared parameter
        kept = next((a for a in aliases if a in weights), None)
        weights.update({a: weights[kept] for a in aliases} if kept else {})
    return weights


def barrier():
    if DISTRIBUTED:
        import torch.distributed as dist

        dist.barrier()


# ---- outputs, checkpoints, logs ------------------------------------------------------------------------
def check_output_dir(args, script: str):
    """Refuse to overwrite what is not a run of this script; with --resume, require its checkpoint and arguments."""
    output_dir = args.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        fail(f"--output_dir {output_dir!r} is a file")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        infos = [os.path.join(output_dir, "run.json"), os.path.join(output_dir, CHECKPOINT, "run.json")]
        previous = next((json.load(open(i)).get("script") for i in infos if os.path.isfile(i)), None)
        if previous != script:
            what = f"the output of {previous}" if previous else "files that no run of this project wrote"
            fail(f"--output_dir {output_dir!r} already holds {what}; choose another directory or remove it")
    if args.resume:
        if not os.path.isfile(os.path.join(output_dir, CHECKPOINT, "state.pt")):
            fail(f"--resume: no checkpoint in {output_dir!r} (write them with --save_every)")
        saved = json.load(open(os.path.join(output_dir, CHECKPOINT, "run.json")))["args"]
        now = json.loads(json.dumps(vars(args), default=str))  # as run.json holds them
        changed = {k: v for k, v in now.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v}
        if changed:
            changes = ", ".join(f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in changed.items())
            fail(f"--resume with other arguments than the checkpoint's run: {changes}")


def write_atomic(target: str, script: str, args, write, write_shards=None):
    """write(tmp) fills a temporary directory that then takes target's place by renames: never half of one.
    Every rank calls it: write_shards(tmp), when given, runs on every rank (a sharded save is a collective),
    write(tmp) and the renames on rank 0 only."""
    target = target.rstrip("/")
    pid = gather([os.getpid()])[0]  # rank 0's: one directory for all ranks
    tmp, old = f"{target}.tmp-{pid}", f"{target}.old-{pid}"
    if RANK == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if write_shards is not None:
        write_shards(tmp)
    if RANK == 0:
        write(tmp)
        write_json(os.path.join(tmp, "run.json"), {"script": script, "args": vars(args)})
        if os.path.exists(target):
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def save_checkpoint(output_dir: str, script: str, args, models: dict, optimizer, scheduler, state: dict):
    """All a run needs to continue as if never stopped: weights and optimizer state (torch.distributed.checkpoint:
    under torchrun each rank writes its own shards, no rank ever holds the whole), the scheduler, every rank's
    RNGs and the script's `state` (the same on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(torch.nn.ModuleDict(models), optimizer)  # names prefixed by the models' keys
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None  # sampling on the GPU draws here
    rngs = gather([{"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "cuda_rng": cuda_rng}])

    def write_shards(tmp):
        dcp.save({"models": weights, "optimizer": optim}, checkpoint_id=os.path.join(tmp, "shards"))

    def write(tmp):
        scheduler_state = scheduler.state_dict() if scheduler else None
        torch.save({"scheduler": scheduler_state, "rngs": rngs, **state}, os.path.join(tmp, "state.pt"))

    write_atomic(os.path.join(output_dir, CHECKPOINT), script, args, write, write_shards)


def load_checkpoint(output_dir: str, models: dict, optimizer, scheduler) -> dict:
    """Restore what save_checkpoint wrote; return the script's own state (tensors only: weights_only=True)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(output_dir, CHECKPOINT)
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    if "rngs" not in state:
        fail(f"--resume: {path} was written by an older version of this script (no sharded checkpoint)")
    rngs = state.pop("rngs")
    if len(rngs) != WORLD_SIZE:  # each rank continues its own random streams
        launch = f"torchrun --nproc_per_node {len(rngs)}" if len(rngs) > 1 else "python"
        fail(f"--resume: the checkpoint was written by {len(rngs)} processes, this run has {WORLD_SIZE}: use {launch}")
    modules = torch.nn.ModuleDict(models)
    weights, optim = get_state_dict(modules, optimizer)
    saved = {"models": weights, "optimizer": optim}
    dcp.load(saved, checkpoint_id=os.path.join(path, "shards"))
    set_state_dict(modules, optimizer, model_state_dict=saved["models"], optim_state_dict=saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rngs[RANK]["torch_rng"])
    random.setstate(rngs[RANK]["python_rng"])
    if rngs[RANK]["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rngs[RANK]["cuda_rng"])
    print(f"resumed from {path} at step {state.get('step')}")
    return state


def finite_or_stop(value: torch.Tensor, what: str, step: int, skip: bool) -> bool:
    """True when `value` is finite on every rank; else stop, naming the step, before anything more is saved (or,
    with skip, False: every rank skips alike)."""
    if bool(torch.isfinite(reduce_sum(value.detach().float().sum()))):  # inf or nan on any rank makes the sum so
        return True
    if skip:
        print(f"note: non-finite {what} at step {step}: batch skipped (--skip_nonfinite)")
        return False
    print(file=sys.stderr)  # end the progress bar's line, so the error is a line of its own
    intact = "the last checkpoint and output are intact; --skip_nonfinite skips such batches"
    fail(f"non-finite {what} at step {step}; stopped before saving anything more ({intact})")


def start_tracking(args, script: str):
    """(log, history): log(metrics, step) appends to history (metrics.jsonl), and to wandb only with --track."""
    history, wandb = [], None
    if args.track and RANK == 0:
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
