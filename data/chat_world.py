"""The offline world's datasets as chat messages, for an instruct model (extras/smollm2.py's SmolLM2):

    python data/chat_world.py       # -> runs/world_chat/{sft,preference,ranking,ratings,binary,prompts}

Each prompt becomes a system message asking for the review's continuation and a user message with the opening
(the instruction is the policy's; rlaif.py's labeller reads the user's turn only); each response (completion, chosen,
rejected, a ranking's responses) the assistant's reply, without the leading space that continued the text; a
rating or a thumbs label stays as it is. The gold rater reads the responses only, so data.gold:score scores the
replies as it scores the continuations. Every script reads these files unchanged: conversational rows are rendered
with the tokenizer's chat template.
"""

import json
import os
import sys

INSTRUCTION = "Continue the user's movie review with two to four sentences."
SPLITS = ("sft", "preference", "ranking", "ratings", "binary", "prompts")


def user(prompt: str) -> list[dict]:
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": prompt.strip()}]


def assistant(response: str) -> list[dict]:
    return [{"role": "assistant", "content": response.strip()}]


def to_chat(row: dict) -> dict:
    """One row of the world (any of its datasets) with its prompt and responses as chat messages."""
    out = dict(row, prompt=user(row["prompt"]))  # a rating or a label as it is
    for key in ("completion", "chosen", "rejected"):
        if key in row:
            out[key] = assistant(row[key])
    if "responses" in row:
        out["responses"] = [assistant(r) for r in row["responses"]]
    return out


def write(world: str, out: str, names=SPLITS, rows: int | None = None):
    """Write world/<name>/{train,test}.jsonl as chat rows under out/<name>/ (the first `rows` of each split)."""
    for name in names:
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for split in ("train", "test"):
            with open(os.path.join(world, name, f"{split}.jsonl")) as f:
                lines = f.readlines()[:rows]
            with open(os.path.join(out, name, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(to_chat(json.loads(line))) + "\n" for line in lines)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    target = sys.argv[1] if len(sys.argv) > 1 else "runs/world_chat"
    write(os.path.join(here, "world"), target)
    print(f"wrote {', '.join(SPLITS)} under {target}")
