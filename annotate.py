"""People in the loop: a labelling page that turns a model's samples into the datasets the scripts train on.

    python annotate.py                                    # sample runs/sft on 200 prompts, serve the page
    python annotate.py --form ranking --num_responses 4   # rank 4 responses a prompt instead
    python annotate.py --export                           # the labels as datasets: runs/labels/export/pairs, ...

1. Sampling: num_responses responses to each of num_prompts training prompts of --dataset_name, as the policy's
   rollouts sample them (response_length tokens at rollout_temperature, cut after the first EOS), saved to
   items.jsonl before anything is served: item i and its responses 0..K-1 are the ids every label refers to.
   A restart serves the same items.
2. Serving: a page on 127.0.0.1 (annotate.html, beside this script: the page reads and edits as HTML) shows one
   item at a time, its responses in an order shuffled for each annotator (a judge favours a position: detail
   22), and asks for one form of feedback (--form):
     pairwise  which of two responses is better, or a tie (ties are allowed; a tie exports as no pair)
     ranking   the K responses ordered best to worst
     rating    a 1-7 score for each response
     binary    thumbs up or down for each response
   and, in every form, an edit: a response rewritten into what it should have been. Every label is appended to
   labels.jsonl as one JSON line (id, annotator, item, form, label, time) and flushed to disk before it is
   acknowledged, so a crash loses at most the label in flight; an undo is a row too, so the log only grows.
   The page makes each label's id, so a request it retries is written once.
3. Agreement: with --annotators_per_item above 1 an item goes to that many people, and the share of their
   comparisons on which two people agree is reported: the ceiling of a reward model trained on their labels.
4. Export (--export): pairs {prompt, chosen, rejected} for reward.py and dpo.py (from pairwise choices, the
   K(K-1)/2 pairs of each ranking, each two responses rated differently, and each edit over its original),
   rankings {prompt, responses} for reward.py, binary {prompt, completion, label}, ratings {prompt, completion,
   rating}, and sft {prompt, completion} (the edits) for sft.py; split into train and test by prompt.

Security, as the page runs on the machine of a person who browses other sites at the same time, and any site can
send requests to localhost (CSRF) or reach it through a name that resolves to 127.0.0.1 (DNS rebinding): it binds
127.0.0.1; every request must carry the access token made at start (printed once, in the address to open) and
compared in constant time; the Host header must name this server; no CORS header is ever sent (a script on another
site cannot read an answer, nor send the token header); a label must be a JSON body (a cross-site form cannot
send one without the browser asking first); model text is shown with textContent, never as HTML, under a
Content-Security-Policy that runs only the page's own script; a bad request gets a 4xx with a one-line reason and
writes nothing; only the page and its API are served, no file by its path.
"""

import fcntl
import hmac
import itertools
import json
import math
import os
import random
import re
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import numpy as np
import tyro

import common
import plumbing

FORMS = ("pairwise", "ranking", "rating", "binary")
LABEL_KEYS = {"pairwise": {"chosen"}, "ranking": {"order"}, "rating": {"ratings"}, "binary": {"up"}}
LABEL_KEYS["edit"] = {"response", "text"}
FIELDS = {"id", "annotator", "client", "item", "form", "label"}  # of a posted label
NAME = re.compile(r"[\w.@ -]{1,40}")  # an annotator's name
ID = re.compile(r"[\w-]{1,80}")  # a label's id, a page's client id
MAX_BODY = 64 * 1024  # bytes of a request body
LEASE_SECONDS = 600  # an item shown to one page is offered to no other for this long
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "annotate.html")


@dataclass
class Args:
    # ---- feedback ----
    form: Literal["pairwise", "ranking", "rating", "binary"] = "pairwise"
    """the feedback asked for: pairwise (which of two is better, or a tie), ranking (the responses best to worst),
    rating (1-7 each) or binary (thumbs up or down each); an edit of a response in every form"""
    num_responses: int = 2
    """responses sampled per prompt (pairwise compares 2)"""
    annotators_per_item: int = 1
    """people each item is shown to in this form; above 1, their agreement is reported"""
    # ---- sampling ----
    model_name_or_path: str = "runs/sft"
    """the causal LM whose responses are labelled (hub id or local directory)"""
    dataset_name: str = "data/world/prompts"
    """prompts {prompt} (text or chat messages); the first num_prompts of its train split are answered"""
    num_prompts: int = 200
    """prompts to sample responses to"""
    max_prompt_length: int = 128
    """longest prompt in tokens; longer ones are dropped, counted"""
    response_length: int = 48
    """tokens sampled per response (ppo.py's rollouts')"""
    rollout_temperature: float = 0.7
    """sampling temperature (ppo.py's rollouts')"""
    batch_size: int = 64
    """responses sampled at once"""
    # ---- serving ----
    host: str = "127.0.0.1"
    """the address the page is served on; the Host header of every request must name it (or localhost)"""
    port: int = 8000
    """the port (0: any free one)"""
    # ---- export ----
    export: bool = False
    """write the labels as datasets to output_dir/export (serve nothing)"""
    test_fraction: float = 0.1
    """share of the prompts whose labels go to the test split of every exported dataset"""
    # ---- run ----
    output_dir: str = "runs/labels"
    """where items.jsonl (the responses), labels.jsonl (the log) and export/ are written"""
    seed: int = 1
    """seed of sampling, of the order responses are shown in, and of the export's split"""
    bf16: bool | None = None
    """bf16 autocast (--bf16 True/False); by default on with CUDA, off on the CPU"""


# ---- 1. sampling -------------------------------------------------------------------------------------------
def sample_items(args) -> list[dict]:
    """num_responses responses to each prompt, sampled as ppo.py's rollouts are: {item, prompt, responses}."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    device, autocast, _, _ = plumbing.device_and_autocast(args.bf16, compile=False)
    rows = common.load_splits(args.dataset_name, [["prompt"]], seed=args.seed)[0][: args.num_prompts]
    tok = common.load_tokenizer(args.model_name_or_path)
    model = plumbing.load_model(AutoModelForCausalLM, args.model_name_or_path, tok, device).eval()
    prompt_ids, kept = common.encode_prompts(tok, rows, args.max_prompt_length)
    k, eos, per_batch = args.num_responses, tok.eos_token_id, max(1, args.batch_size // args.num_responses)
    responses = []
    for i in tqdm(range(0, len(prompt_ids), per_batch), desc="sampling"):
        batch = [p for p in prompt_ids[i : i + per_batch] for _ in range(k)]  # each prompt k times, side by side
        ids, mask = (t.to(device) for t in common.pad(batch, tok.pad_token_id, "left"))
        with torch.inference_mode(), autocast:
            raw = common.sample(model, ids, mask, args.response_length, args.rollout_temperature, eos, stop_at_eos=True)
        texts = tok.batch_decode(common.truncate_after_eos(raw, eos, tok.pad_token_id)[0], skip_special_tokens=True)
        responses += [texts[j : j + k] for j in range(0, len(texts), k)]
    return [
        {"item": n, "prompt": rows[i]["prompt"], "responses": r}
        for n, (i, r) in enumerate(zip(kept, responses, strict=True))
    ]


def read_items(path: str, form: str) -> list[dict]:
    items = common.read_json_rows(path)
    if not items or any(r.get("item") != n or common.text_problem(r.get("prompt")) for n, r in enumerate(items)):
        plumbing.fail(f"{path} is not a list of {{item, prompt, responses}} rows numbered from 0")
    sizes = {len(r["responses"]) if isinstance(r.get("responses"), list) else 0 for r in items}
    if min(sizes) < 1 or not all(isinstance(x, str) for r in items for x in r["responses"]):
        plumbing.fail(f"{path}: every item needs a list of responses as text")
    if form == "pairwise" and sizes != {2}:
        plumbing.fail(f"--form pairwise compares 2 responses; the items of {path} hold {max(sizes)} (--form ranking)")
    if form == "ranking" and min(sizes) < 2:
        plumbing.fail(f"--form ranking orders 2 responses or more; the items of {path} hold {min(sizes)}")
    return items


# ---- 2. the labels: a log that only grows ------------------------------------------------------------------
def label_problem(body, items: list[dict], form: str) -> str | None:
    """What makes a posted label invalid (one line), or None: everything is checked before anything is written."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    missing, unknown = FIELDS - {"client"} - set(body), set(body) - FIELDS
    if missing or unknown:
        return f"a label has the fields {sorted(FIELDS)}: {sorted(missing)} missing, {sorted(unknown)[:3]} unknown"
    if not isinstance(body["id"], str) or not ID.fullmatch(body["id"]):
        return "'id' must be 1-80 letters, digits, '-' or '_'"
    if "client" in body and (not isinstance(body["client"], str) or not ID.fullmatch(body["client"])):
        return "'client' must be 1-80 letters, digits, '-' or '_'"
    if not isinstance(body["annotator"], str) or not NAME.fullmatch(body["annotator"]):
        return "'annotator' must be a name of 1-40 letters, digits, spaces or . @ _ -"
    item, label = body["item"], body["label"]
    if type(item) is not int or not 0 <= item < len(items):
        return f"unknown item {item!r:.40}"
    if body["form"] not in (form, "edit"):
        return f"form {body['form']!r:.40} is not this page's ({form}, or edit)"
    responses = items[item]["responses"]
    k, keys = len(responses), LABEL_KEYS[body["form"]]
    if not isinstance(label, dict) or set(label) != keys:
        return f"a {body['form']} label is an object with the key(s) {sorted(keys)}"
    value = label[next(iter(sorted(keys)))]
    if body["form"] == "pairwise" and not (value is None or type(value) is int and value in (0, 1)):
        return "'chosen' must be the better response, 0 or 1, or null for a tie"
    if body["form"] == "ranking" and (not isinstance(value, list) or sorted(value) != list(range(k))):
        return f"'order' must hold each of the {k} responses once, best first"
    if body["form"] == "rating" and not (
        isinstance(value, list) and len(value) == k and all(type(x) is int and 1 <= x <= 7 for x in value)
    ):
        return f"'ratings' must hold a score from 1 to 7 for each of the {k} responses"
    if body["form"] == "binary" and not (
        isinstance(value, list) and len(value) == k and all(type(x) is bool for x in value)
    ):
        return f"'up' must hold true or false for each of the {k} responses"
    if body["form"] == "edit":
        r, text = label["response"], label["text"]
        if type(r) is not int or not 0 <= r < k:
            return f"'response' must be one of the item's responses, 0 to {k - 1}"
        if not isinstance(text, str) or not text.strip() or text == responses[r]:
            return "'text' must be the response rewritten: text that differs from it"
    return None


def undo_problem(body) -> str | None:
    """What makes a posted undo invalid (one line), or None."""
    if not isinstance(body, dict) or not {"id", "annotator"} <= set(body) <= {"id", "annotator", "client"}:
        return "an undo is an object {id, annotator} (and the page's client)"
    if not all(isinstance(v, str) and (NAME if k == "annotator" else ID).fullmatch(v) for k, v in body.items()):
        return "an undo's 'id' and 'client' are 1-80 letters, digits, '-' or '_', its 'annotator' a name"
    return None


def read_log(path: str, repair: bool) -> list[dict]:
    """The rows of labels.jsonl. A last line without its newline is a row cut by a crash while it was written, never
    acknowledged: it is skipped, and with `repair` (the server, before it appends) cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        print(f"note: {path}: a line cut by a crash while it was written (never acknowledged) removed")
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not {"id", "annotator", "item", "form", "label"} <= set(row):
            plumbing.fail(f"{path}, line {n}: not a label row (annotator, item, form, label): the log is corrupt")
        rows.append(row)
    return rows


class LabelLog:
    """The labels of labels.jsonl, replayed (an undo removes what it undoes) and appended to as they arrive, under
    one lock: concurrent requests neither lose nor duplicate a row."""

    def __init__(self, path: str, items: list[dict], form: str, annotators_per_item: int, repair: bool = False):
        self.path, self.items, self.form, self.per_item = path, items, form, annotators_per_item
        self.lock, self.file = threading.Lock(), None
        self.ids = set()  # of every row written: a request retried is acknowledged, not written again
        self.live = {}  # label id -> row, every label not undone, in the order given
        self.judged = {}  # (annotator, item, form) -> the id of that annotator's judgement of the item
        self.leases = {}  # page's client id -> (item, expiry, annotator): the item it shows, offered to no other page
        for row in read_log(path, repair):
            self.apply(row)

    def apply(self, row: dict):
        self.ids.add(row["id"])
        if row["form"] == "undo":
            undone = self.live.pop(row["label"]["undoes"], None)
            if undone and undone["form"] != "edit":
                del self.judged[(undone["annotator"], undone["item"], undone["form"])]
            return
        self.live[row["id"]] = row
        if row["form"] != "edit":
            self.judged[(row["annotator"], row["item"], row["form"])] = row["id"]

    def append(self, row: dict):
        """Written and flushed to disk before it is applied, and before the request is acknowledged."""
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.apply(row)

    def add(self, body: dict) -> tuple[int, dict]:
        """A valid label (label_problem passed): (HTTP status, answer)."""
        with self.lock:
            if body["id"] in self.ids:
                return 200, {"written": False, "duplicate": True}  # a retry of a label already written
            if body["form"] != "edit" and (body["annotator"], body["item"], body["form"]) in self.judged:
                return 409, {"error": f"{body['annotator']} has already labelled item {body['item']}: undo it first"}
            row = {k: body[k] for k in ("id", "annotator", "item", "form", "label")}
            self.append({**row, "time": round(time.time(), 3)})
            return 200, {"written": True}

    def undo(self, annotator: str, undo_id: str, client: str | None) -> dict:
        """Undo the annotator's last label: a row that says so. The page shows the item again."""
        with self.lock:
            if undo_id in self.ids:
                return {"undone": None, "duplicate": True}
            last = next((r for r in reversed(self.live.values()) if r["annotator"] == annotator), None)
            if last is None:
                return {"undone": None}
            self.append(
                {"id": undo_id, "annotator": annotator, "item": last["item"], "form": "undo",
                 "label": {"undoes": last["id"]}, "time": round(time.time(), 3)}
            )  # fmt: skip
            if client and last["form"] != "edit":
                self.leases[client] = (last["item"], time.time() + LEASE_SECONDS, annotator)
            return {"undone": last["id"]}

    def next_item(self, annotator: str, client: str) -> int | None:
        """The item to show a page: the one it holds, else one this annotator has not labelled and that fewer than
        annotators_per_item people have labelled or hold, preferring those others began (agreement needs them)."""
        now, form = time.time(), self.form
        held = self.leases.get(client)
        if held and held[1] > now and (annotator, held[0], form) not in self.judged:
            return held[0]
        counts = Counter(i for (_, i, f) in self.judged if f == form)
        counts.update(
            i
            for c, (i, expiry, a) in self.leases.items()
            if c != client and expiry > now and (a, i, form) not in self.judged
        )  # the items other pages show, not yet labelled there
        free = [
            i for i in range(len(self.items)) if (annotator, i, form) not in self.judged and counts[i] < self.per_item
        ]
        if not free:
            self.leases.pop(client, None)
            return None
        i = max(free, key=lambda i: (counts[i], -i))
        self.leases[client] = (i, now + LEASE_SECONDS, annotator)
        return i

    def state(self, annotator: str, client: str, seed: int) -> dict:
        """What the page shows: the next item (responses in this annotator's order), the progress, the agreement."""
        with self.lock:
            i = self.next_item(annotator, client)
            item = None
            if i is not None:
                responses = self.items[i]["responses"]
                order = random.Random(f"{seed}/{i}/{annotator}").sample(range(len(responses)), len(responses))
                edits = {
                    r["label"]["response"]: r["label"]["text"]
                    for r in self.live.values()
                    if r["form"] == "edit" and r["item"] == i and r["annotator"] == annotator
                }
                shown = [{"id": k, "text": responses[k], "edit": edits.get(k)} for k in order]
                item = {"item": i, "prompt": self.items[i]["prompt"], "responses": shown}
            labels = [key for key in self.judged if key[2] == self.form]
            return {
                "form": self.form,
                "item": item,
                "mine": sum(a == annotator for a, _, _ in labels),
                "labels": len(labels),
                "needed": len(self.items) * self.per_item,
                "agreement": agreement(self.form, self.item_scores(self.form)),
                "can_undo": any(r["annotator"] == annotator for r in self.live.values()),
            }

    def item_scores(self, form: str) -> dict[int, list[list]]:
        """Each item's labels of a form, each as a score for each of its responses (scores())."""
        out = {}
        for (_, i, f), label_id in self.judged.items():
            if f == form:
                k = len(self.items[i]["responses"])
                out.setdefault(i, []).append(scores(form, self.live[label_id]["label"], k))
        return out


# ---- 3. agreement between people -----------------------------------------------------------------------------
def scores(form: str, label: dict, k: int) -> list:
    """A label as a score for each response, higher for better: a pairwise choice 1 and 0, a tie 0 and 0."""
    if form == "pairwise":
        return [int(r == label["chosen"]) for r in range(k)]
    if form == "ranking":
        return [-label["order"].index(r) for r in range(k)]
    return list(label["ratings"] if form == "rating" else label["up"])


def agreement(form: str, item_scores: dict[int, list[list]]) -> dict | None:
    """How often two people who labelled the same item agree, over every two annotators of every item: on the order
    of each two responses (a tie agrees only with a tie), or for thumbs on each response's thumb. None: no item
    has two annotators."""
    agree = n = 0
    for labels in item_scores.values():
        for a, b in itertools.combinations(labels, 2):
            if form == "binary":
                same = [x == y for x, y in zip(a, b, strict=True)]
            else:
                pairs = itertools.combinations(range(len(a)), 2)
                same = [np.sign(a[r] - a[s]) == np.sign(b[r] - b[s]) for r, s in pairs]
            agree, n = agree + sum(same), n + len(same)
    return {"rate": agree / n, "comparisons": n} if n else None


# ---- 4. export -----------------------------------------------------------------------------------------------
def reply(prompt, text: str):
    """A response as a dataset holds it: text, or after a chat prompt an assistant message (as sl_cai.py writes)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def export(log: LabelLog, args) -> dict:
    """The live labels as the datasets the scripts read, each split into train and test by prompt (a prompt's
    labels all go to one split, drawn once for every item: the split of a prompt never changes as labels come)."""
    items, data, ties = log.items, {name: [] for name in ("pairs", "rankings", "binary", "ratings", "sft")}, 0
    edits = {}  # (annotator, item, response) -> the text of the annotator's latest edit of it
    for row in log.live.values():
        form, label, item = row["form"], row["label"], items[row["item"]]
        prompt, responses = item["prompt"], item["responses"]
        better = []  # (chosen, rejected) response ids
        if form == "pairwise":
            ties += label["chosen"] is None
            better = [] if label["chosen"] is None else [(label["chosen"], 1 - label["chosen"])]
        elif form == "ranking":
            data["rankings"].append(
                {"prompt": prompt, "responses": [reply(prompt, responses[r]) for r in label["order"]]}
            )
            better = list(itertools.combinations(label["order"], 2))  # each response over every one ranked below it
        elif form == "rating":
            ratings = label["ratings"]
            data["ratings"] += [
                {"prompt": prompt, "completion": reply(prompt, t), "rating": x}
                for t, x in zip(responses, ratings, strict=True)
            ]
            better = [(r, s) for r, s in itertools.permutations(range(len(responses)), 2) if ratings[r] > ratings[s]]
        elif form == "binary":
            data["binary"] += [
                {"prompt": prompt, "completion": reply(prompt, t), "label": up}
                for t, up in zip(responses, label["up"], strict=True)
            ]
        else:
            edits[(row["annotator"], row["item"], label["response"])] = label["text"]
        data["pairs"] += [
            {"prompt": prompt, "chosen": reply(prompt, responses[c]), "rejected": reply(prompt, responses[r])}
            for c, r in better
        ]
    for (_, i, r), text in edits.items():  # a correction: a demonstration, and a pair (the edit over the original)
        prompt = items[i]["prompt"]
        data["sft"].append({"prompt": prompt, "completion": reply(prompt, text)})
        data["pairs"].append(
            {"prompt": prompt, "chosen": reply(prompt, text), "rejected": reply(prompt, items[i]["responses"][r])}
        )
    # the test prompts: a seeded draw of test_fraction of the distinct prompts
    prompts = list(dict.fromkeys(json.dumps(x["prompt"]) for x in items))
    order = np.random.default_rng(args.seed).permutation(len(prompts))
    test = {prompts[i] for i in order[: math.ceil(args.test_fraction * len(prompts))]} if len(prompts) > 1 else set()
    splits = {
        name: {s: [x for x in rows if (json.dumps(x["prompt"]) in test) == (s == "test")] for s in ("train", "test")}
        for name, rows in data.items()
        if rows
    }
    results = {name: {s: len(x) for s, x in split.items()} for name, split in splits.items()}
    results["pairwise_ties"] = ties
    results["agreement"] = {f: a for f in FORMS if (a := agreement(f, log.item_scores(f)))}

    def write(tmp):
        for name, split in splits.items():
            os.makedirs(os.path.join(tmp, name))
            for s, rows in split.items():
                if rows:
                    plumbing.write_jsonl(os.path.join(tmp, name, f"{s}.jsonl"), rows)
        plumbing.write_json(os.path.join(tmp, "export.json"), results)

    plumbing.write_atomic(os.path.join(args.output_dir, "export"), "annotate.py", args, write)
    return results


# ---- the server: the page and its API ------------------------------------------------------------------------
def make_handler(log: LabelLog, args, token: str):
    page = open(PAGE, encoding="utf-8").read()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):  # request lines carry the token: not printed
            pass

        def reply(self, status: int, body, content_type="application/json", csp="default-src 'none'"):
            data = (json.dumps(body) if content_type == "application/json" else body).encode()
            self.send_response(status)
            for header, value in (
                ("Content-Type", f"{content_type}; charset=utf-8"), ("Content-Length", str(len(data))),
                ("Content-Security-Policy", csp), ("Cache-Control", "no-store"), ("Referrer-Policy", "no-referrer"),
                ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
            ):  # fmt: skip
                self.send_header(header, value)
            self.end_headers()
            self.wfile.write(data)

        def refused(self) -> bool:
            """A request from elsewhere: a Host that is not this server (DNS rebinding), or no right token (CSRF)."""
            host, port = self.headers.get("Host", "").lower(), self.server.server_address[1]
            if host not in {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]", args.host.lower())}:
                self.reply(403, {"error": f"Host {host!r:.60} is not this server's address"})
                return True
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            given = self.headers.get("X-Token") or query.get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), token.encode()):
                self.reply(403, {"error": "wrong or missing token: open the address annotate.py printed"})
                return True
            return False

        def do_GET(self):
            if self.refused():
                return
            url = urllib.parse.urlsplit(self.path)
            query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            if url.path == "/":
                nonce = secrets.token_urlsafe(16)  # only the page's own script and style run
                csp = f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
                csp += "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                self.reply(200, page.replace("{{nonce}}", nonce), "text/html", csp)
            elif url.path == "/api/state":
                annotator, client = query.get("annotator", ""), query.get("client", "")
                if not NAME.fullmatch(annotator) or not ID.fullmatch(client):
                    return self.reply(400, {"error": "'annotator' (a name of 1-40 characters) and 'client' needed"})
                self.reply(200, log.state(annotator, client, args.seed))
            else:
                self.reply(404, {"error": f"no page {url.path!r:.60}"})

        def do_POST(self):
            if self.refused():
                return
            path = urllib.parse.urlsplit(self.path).path
            if path not in ("/api/label", "/api/undo"):
                return self.reply(404, {"error": f"no page {path!r:.60}"})
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                return self.reply(415, {"error": "a label is a JSON body (Content-Type: application/json)"})
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                return self.reply(411, {"error": "no Content-Length"})
            if int(length) > MAX_BODY:
                self.close_connection = True  # the body is not read
                return self.reply(413, {"error": f"a body of {length} bytes; at most {MAX_BODY}"})
            try:
                body = json.loads(self.rfile.read(int(length)))
            except ValueError:  # UnicodeDecodeError and JSONDecodeError among them
                return self.reply(400, {"error": "the body is not JSON"})
            if path == "/api/undo":
                problem = undo_problem(body)
                if problem:
                    return self.reply(400, {"error": problem})
                return self.reply(200, log.undo(body["annotator"], body["id"], body.get("client")))
            problem = label_problem(body, log.items, log.form)
            if problem:
                return self.reply(400, {"error": problem})
            self.reply(*log.add(body))

    return Handler


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    plumbing.check_ranges(
        args,
        {
            "(0, inf)": "num_responses annotators_per_item num_prompts max_prompt_length response_length "
            "rollout_temperature batch_size",
            "[0, 65535]": "port",
            "[0, 1)": "test_fraction",
            "(-inf, inf)": "seed",
        },
    )
    plumbing.check_output_dir(args, "annotate.py")
    items_path, log_path = (os.path.join(args.output_dir, f) for f in ("items.jsonl", "labels.jsonl"))
    if args.export:
        if not os.path.isfile(items_path):
            plumbing.fail(f"{args.output_dir!r} holds no items.jsonl: nothing was labelled there")
        log = LabelLog(log_path, read_items(items_path, None), args.form, args.annotators_per_item)
        if not log.live:
            plumbing.fail(f"{log_path} holds no label yet")
        results = export(log, args)
        print(json.dumps(results, indent=2))
        print(f"saved {args.output_dir}/export: python reward.py --dataset_name {args.output_dir}/export/pairs ...")
        raise SystemExit

    # ---- 1. the responses, sampled once and saved before anything is served --------------------------------------
    if os.path.isfile(items_path):
        print(f"note: serving the items sampled before in {items_path} (delete it, or another --output_dir, to sample)")
    else:
        plumbing.seed_everything(args.seed)
        sampled = sample_items(args)
        plumbing.write_atomic(
            args.output_dir, "annotate.py", args, lambda tmp: plumbing.write_jsonl(f"{tmp}/items.jsonl", sampled)
        )
    items = read_items(items_path, args.form)

    # ---- 2. the log, replayed; one server a log -----------------------------------------------------------------
    lock = open(os.path.join(args.output_dir, ".serving"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        plumbing.fail(f"another annotate.py is serving {args.output_dir!r}")
    log = LabelLog(log_path, items, args.form, args.annotators_per_item, repair=True)
    token = secrets.token_urlsafe(32)  # printed once, in the address to open
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(log, args, token))
    except OSError as e:
        plumbing.fail(f"cannot serve on {args.host}:{args.port}: {plumbing.describe(e)} (--port 0 picks a free one)")
    server.daemon_threads = True
    given, needed = sum(f == args.form for _, _, f in log.judged), len(items) * args.annotators_per_item
    print(f"{len(items)} items, {args.form}: {given} of {needed} labels given ({log_path})")
    print(f"open http://{args.host}:{server.server_address[1]}/?token={token}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nstopped; {len(log.live)} labels in {log_path}; python annotate.py --export writes the datasets")
