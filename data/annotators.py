"""The offline world's simulated annotators: the gold rater's judgement through the noise of real labellers.

    from data.annotators import label_pairs, rank_responses
    pairs = label_pairs(prompts, firsts, seconds, seed=0)        # {prompt, chosen, rejected} rows
    rankings = rank_responses(prompts, responses, seed=0)       # {prompt, responses (best first)} rows
    answer(rng, "rating", shown)                                 # what it answers to the labelling page

Pairs follow Bradley-Terry: a annotator prefers a over b with probability sigmoid((gold(a) - gold(b)) / T).
Rankings of K responses follow Plackett-Luce, its generalisation: the best is drawn with probability
softmax(gold / T) over the K, the second from the rest, and so on, so that any two of a ranking are ordered
as Bradley-Terry orders them. T = LABEL_TEMPERATURE: at 0.15 the gold rater agrees with ~90% of the world's
held-out pair labels. Any responses can be sent to these annotators: the world's datasets were, and so are
a policy's own samples in benchmarks/iterated.py. And they answer the labelling page (annotate.py) as a person
would, from what it shows: answer() gives each form's answer, correction() an edit.
"""

import math
import random
import re

from data.gold import gold_score

LABEL_TEMPERATURE = 0.15


def prefers_first(rng: random.Random, a: str, b: str) -> bool:
    """One annotator's choice between two responses (Bradley-Terry on the gold rating)."""
    return rng.random() < 1 / (1 + math.exp(-(gold_score(a) - gold_score(b)) / LABEL_TEMPERATURE))


def ranking(rng: random.Random, responses: list[str]) -> list[str]:
    """One annotator's ranking of responses, best first (Plackett-Luce on the gold rating)."""
    return [responses[i] for i in ranked_positions(rng, responses)]


def ranked_positions(rng: random.Random, responses: list[str]) -> list[int]:
    """ranking() as the positions of the responses, best first."""
    left = list(range(len(responses)))
    weights = [math.exp(gold_score(r) / LABEL_TEMPERATURE) for r in responses]
    order = []
    while left:
        i = rng.choices(range(len(left)), weights)[0]
        order.append(left.pop(i))
        weights.pop(i)
    return order


def label_pairs(prompts, firsts, seconds, seed: int = 0) -> list[dict]:
    """{prompt, chosen, rejected} rows: each pair judged once by a simulated annotator."""
    rng = random.Random(seed)
    rows = []
    for p, a, b in zip(prompts, firsts, seconds, strict=True):
        chosen, rejected = (a, b) if prefers_first(rng, a, b) else (b, a)
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return rows


def rank_responses(prompts, responses, seed: int = 0) -> list[dict]:
    """{prompt, responses} rows, each prompt's responses ranked best first by a simulated annotator."""
    rng = random.Random(seed)
    return [{"prompt": p, "responses": ranking(rng, rs)} for p, rs in zip(prompts, responses, strict=True)]


def answer(rng: random.Random, form: str, responses: list[str]):
    """One annotator's answer to what the labelling page shows: its form, and the responses in the order shown.
    pairwise: the position of the better of two (Bradley-Terry; identical texts tie: None); ranking: the positions
    best first (Plackett-Luce); rating: a 1-7 score for each, 4 + 3 * (gold + noise) rounded and clipped, the
    noise Gaussian of standard deviation LABEL_TEMPERATURE; binary: a thumb up (True) or down for each, up with
    probability sigmoid(gold / LABEL_TEMPERATURE) (Bradley-Terry against a response of gold rating 0)."""
    if form == "pairwise":
        a, b = responses
        return None if a == b else 0 if prefers_first(rng, a, b) else 1
    if form == "ranking":
        return ranked_positions(rng, responses)
    if form == "rating":
        return [min(7, max(1, round(4 + 3 * (gold_score(r) + rng.gauss(0, LABEL_TEMPERATURE))))) for r in responses]
    if form == "binary":
        return [rng.random() < 1 / (1 + math.exp(-gold_score(r) / LABEL_TEMPERATURE)) for r in responses]
    raise ValueError(f"no form {form!r}")


def correction(text: str) -> str | None:
    """One annotator's edit of a response: each sentence kept once, and only if the gold rater scores it 0 or more
    (the repetition and the complaints cut). None where that changes nothing or leaves nothing."""
    kept = []
    for sentence in re.findall(r"[^.!?]*[.!?]*", text):
        if sentence.strip() and sentence.strip() not in [k.strip() for k in kept] and gold_score(sentence) >= 0:
            kept.append(sentence)
    edited = "".join(kept)
    return edited if edited.strip() and edited != text else None
