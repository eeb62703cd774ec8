"""The offline world's simulated annotators: the gold rater's judgement through the noise of real labellers.

    from data.annotators import label_pairs, rank_responses, rate_responses, label_responses
    pairs = label_pairs(prompts, firsts, seconds, seed=0)        # {prompt, chosen, rejected} rows
    rankings = rank_responses(prompts, responses, seed=0)       # {prompt, responses (best first)} rows
    ratings = rate_responses(prompts, completions, seed=0)      # {prompt, completion, rating (1-7)} rows
    thumbs = label_responses(prompts, completions, seed=0)      # {prompt, completion, label (thumbs up)} rows
    answer(rng, "rating", shown)                                 # what it answers to the labelling page

Pairs follow Bradley-Terry: a annotator prefers a over b with probability sigmoid((gold(a) - gold(b)) / T).
Rankings of K responses follow Plackett-Luce, its generalisation: the best is drawn with probability
softmax(gold / T) over the K, the second from the rest, and so on, so that any two of a ranking are ordered
as Bradley-Terry orders them. T = LABEL_TEMPERATURE: at 0.15 the gold rater agrees with ~90% of the world's
held-out pair labels. Any responses can be sent to these annotators: the world's datasets were, and so are
a policy's own samples in benchmarks/iterated.py. And they answer the labelling page (annotate.py) as a person
would, from what it shows: answer() gives each form's answer (the same rating() and thumbs_up() as the world's
datasets), correction() an edit.

Direct evaluations, one response at a time, come from the same noise. Bradley-Terry and Plackett-Luce are the
orderings of noisy utilities u = gold + T * g, g a standard Gumbel draw (McFadden's random utility model: the
difference of two such draws is logistic at scale T); here g is centred (its mean, Euler's gamma, subtracted),
so u is the gold rating on average. An annotator's
- rating is u on a 1-7 Likert scale: round(4 + 3 u), clipped to [1, 7], so gold -1 (a damning review) maps
  to 1, 0 (neutral) to 4 and 1 (a rave) to 7; one rating point is 1/3 of gold, about two noise scales T;
- thumbs are up when u > THUMBS_THRESHOLD = 0.2, about the median of u on the demonstrations (0.24): about
  half of them are up (52% of data/world/sft/train).
"""

import math
import random
import re

from data.gold import gold_score

LABEL_TEMPERATURE = 0.15
RATING_SCALE = (1, 7)  # the Likert scale's lowest and highest ratings
THUMBS_THRESHOLD = 0.2
EULER_GAMMA = 0.5772156649015329  # the mean of a standard Gumbel draw


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


def noisy_gold(rng: random.Random, response: str) -> float:
    """One annotator's utility of a response: the gold rating plus centred Gumbel noise at scale T (a standard
    Gumbel draw is minus the log of a standard exponential one)."""
    return gold_score(response) + LABEL_TEMPERATURE * (-math.log(rng.expovariate(1)) - EULER_GAMMA)


def rating(rng: random.Random, response: str) -> int:
    """One annotator's 1-7 rating of a response: its noisy gold rating, 4 + 3 u rounded and clipped."""
    low, high = RATING_SCALE
    return min(high, max(low, round(4 + 3 * noisy_gold(rng, response))))


def thumbs_up(rng: random.Random, response: str) -> bool:
    """One annotator's thumbs on a response: up when its noisy gold rating clears THUMBS_THRESHOLD."""
    return noisy_gold(rng, response) > THUMBS_THRESHOLD


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


def rate_responses(prompts, completions, seed: int | str = 0) -> list[dict]:
    """{prompt, completion, rating} rows: each response rated 1-7 by a simulated annotator."""
    rng = random.Random(seed)
    return [{"prompt": p, "completion": c, "rating": rating(rng, c)} for p, c in zip(prompts, completions, strict=True)]


def label_responses(prompts, completions, seed: int | str = 0) -> list[dict]:
    """{prompt, completion, label} rows (TRL's unpaired format): label true for a simulated annotator's thumbs up."""
    rng = random.Random(seed)
    return [
        {"prompt": p, "completion": c, "label": thumbs_up(rng, c)} for p, c in zip(prompts, completions, strict=True)
    ]


def answer(rng: random.Random, form: str, responses: list[str]):
    """One annotator's answer to what the labelling page shows: its form, and the responses in the order shown.
    pairwise: the position of the better of two (Bradley-Terry; identical texts tie: None); ranking: the positions
    best first (Plackett-Luce); rating: a 1-7 score for each (rating()); binary: a thumb up (True) or down for
    each (thumbs_up()), as the world's ratings/ and binary/ were given."""
    if form == "pairwise":
        a, b = responses
        return None if a == b else 0 if prefers_first(rng, a, b) else 1
    if form == "ranking":
        return ranked_positions(rng, responses)
    if form == "rating":
        return [rating(rng, r) for r in responses]
    if form == "binary":
        return [thumbs_up(rng, r) for r in responses]
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
