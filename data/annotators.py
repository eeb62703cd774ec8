"""The offline world's simulated annotators: the gold rater's judgement through the noise of real labellers.

    from data.annotators import label_pairs, rank_responses
    pairs = label_pairs(prompts, firsts, seconds, seed=0)        # {prompt, chosen, rejected} rows
    rankings = rank_responses(prompts, responses, seed=0)       # {prompt, responses (best first)} rows

Pairs follow Bradley-Terry: a annotator prefers a over b with probability sigmoid((gold(a) - gold(b)) / T).
Rankings of K responses follow Plackett-Luce, its generalisation: the best is drawn with probability
softmax(gold / T) over the K, the second from the rest, and so on, so that any two of a ranking are ordered
as Bradley-Terry orders them. T = LABEL_TEMPERATURE: at 0.15 the gold rater agrees with ~90% of the world's
held-out pair labels. Any responses can be sent to these annotators: the world's datasets were, and so are
a policy's own samples in benchmarks/iterated.py.
"""

import math
import random

from data.gold import gold_score

LABEL_TEMPERATURE = 0.15


def prefers_first(rng: random.Random, a: str, b: str) -> bool:
    """One annotator's choice between two responses (Bradley-Terry on the gold rating)."""
    return rng.random() < 1 / (1 + math.exp(-(gold_score(a) - gold_score(b)) / LABEL_TEMPERATURE))


def ranking(rng: random.Random, responses: list[str]) -> list[str]:
    """One annotator's ranking of responses, best first (Plackett-Luce on the gold rating)."""
    left = list(responses)
    weights = [math.exp(gold_score(r) / LABEL_TEMPERATURE) for r in left]
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
