"""Build the offline world: a movie-review continuation task small enough for two CPU cores.

    python data/make_world.py                   # rewrites data/world/ (seed 0, ~30 s); the files are committed

Everything is drawn from one seeded `random.Random`, and the tokenizer is trained on that text, so two
runs give byte-identical files (tests/test_world.py checks it at a small scale). What it writes:

    data/world/base/        tiny Llama config + its own BPE tokenizer (pad != eos, chat template); no weights:
                            sft.py trains it from random initialisation
    data/world/sft/         {"prompt", "completion"}           demonstrations of mixed sentiment
    data/world/preference/  {"prompt", "chosen", "rejected"}   two demonstrations, labelled by the gold
                                                               rater through Bradley-Terry noise
    data/world/prompts/     {"prompt"}                         review openings for RL and evaluation
    data/world/judge/       {"prompt", "completion"} in chat format: "which response is better, A or B?"
                            under a principle, answered by the gold rater (data for the AI labeler, rlaif.py)
    data/world/ranking/     {"prompt", "responses"}            four demonstrations, ranked best first by the
                                                               gold rater through Plackett-Luce noise
    data/world/ratings/     {"prompt", "completion", "rating"} the preference pairs' responses, each rated 1-7,
    data/world/binary/      {"prompt", "completion", "label"}  and each given thumbs up (true) or down, by the
                                                               gold rater through the same noise
    data/world/constitution.txt, rating_constitution.txt, revision_requests.json: the world's written principles,
                            for rlaif.py's labeller (pairwise, and --judge_mode direct) and sl_cai.py
    data/world/sycophancy/  the sycophancy variant (data/sycophancy.py, its own seed): sft/, preference/, prompts/

Each has train.jsonl and test.jsonl (`datasets.load_dataset("data/world/sft")` gives both splits); no
prompt appears in two splits or two datasets. The gold rater is data/gold.py, the simulated annotators
data/annotators.py.

data/world/judge_model/ is not made here: it is the offline AI labeller, sft.py's fine-tuning of the SFT
policy (runs/sft, seed 1) on data/world/judge in two runs of 3 epochs, committed because it takes ~20 minutes
on 2 CPU cores. The second run continues at a lower learning rate, where the held-out answer loss kept falling
(docs/results.md, "The offline AI labeller"):

    python sft.py --model_name_or_path runs/sft --dataset_name data/world/judge --output_dir /tmp/judge_1 \
        --num_epochs 3 --learning_rate 5e-4 --max_new_tokens 4 --gold_scorer None --eval_every 250 \
        --num_eval_prompts 16
    python sft.py --model_name_or_path /tmp/judge_1 --dataset_name data/world/judge \
        --output_dir data/world/judge_model --num_epochs 3 --learning_rate 2e-4 --max_new_tokens 4 \
        --gold_scorer None --eval_every 250 --num_eval_prompts 16
"""

import argparse
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.annotators import LABEL_TEMPERATURE, label_responses, prefers_first, ranking, rate_responses
from data.gold import gold_score

SEED = 0
VOCAB_SIZE = 2048
# the label noise of the simulated annotators (data/annotators.py): Bradley-Terry for pairs, Plackett-Luce for
# rankings, both at LABEL_TEMPERATURE
assert LABEL_TEMPERATURE == 0.15
SIZES = {"sft": (10000, 500), "preference": (16000, 1000), "prompts": (4000, 500), "judge": (20000, 500)}
SIZES["ranking"] = (4000, 500)  # added later, drawn last: the datasets above and the tokenizer did not change
RANKING_K = 4  # responses ranked per prompt
MODEL = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}Assistant: {{ message['content'] }}<|eos|>\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# ---- the grammar -------------------------------------------------------------------------------------
W = str.split
TITLE_A = W(
    "Amber Broken Crooked Distant Electric Falling Fading Forgotten Golden Hidden Hollow Iron Lonely Lost "
    "Midnight Northern Painted Paper Quiet Restless Salt Scarlet Secret Silent Silver Sleeping Stolen "
    "Sunken Velvet Wandering Winter Wild Burning Glass Last Little Long Crimson Emerald Frozen"
)
TITLE_N = W(
    "Harbor Kingdom River Garden Machine Mirror Signal Orchard Station Island Promise Lantern Horizon "
    "Circus Letter Forest Engine Tower Voyage Shadow Bridge Canyon Storm Echo Lighthouse Carnival Highway "
    "Fortress Vineyard Meadow Glacier Compass Telescope Archive Frontier Sanctuary Daughter Stranger "
    "Witness Orchestra Violin Garden Ferry Parade Tide Comet Wolf Raven Ember"
)
FIRST = W(
    "Maria James Aiko Omar Lena Pavel Grace Tomas Nadia Victor Elena Samuel Ingrid Rafael Chloe Dmitri Priya "
    "Hugo Zara Felix Astrid Mateo Yuki Oscar Leila Bruno Hana Marcus Sofia Kwame Beatrice Ruth Anton Noor"
)
LAST = W(
    "Lopez Carter Tanaka Haddad Novak Petrov Okafor Silva Berg Moreau Quinn Costa Lindqvist Mensah Walsh "
    "Romero Fischer Nakamura Duarte Kowalski Reyes Brennan Sato Adeyemi Larsen Vargas Keller Osei Murphy Ahmed"
)
GENRE = [
    "drama",
    "comedy",
    "thriller",
    "horror film",
    "western",
    "romance",
    "documentary",
    "mystery",
    "musical",
    "fantasy",
    "science fiction film",
    "animated film",
    "crime drama",
    "war film",
    "period piece",
    "heist movie",
]
ROLE = W(
    "detective soldier teacher pilot thief doctor widow farmer singer sailor journalist boxer priest scientist "
    "lawyer painter nurse mechanic explorer mayor librarian bartender carpenter composer gardener magician"
)
GOAL = [
    "looks for a missing sister",
    "tries to save a failing farm",
    "returns home after twenty years",
    "plans one last job",
    "falls for a stranger",
    "hunts a killer",
    "runs for mayor",
    "crosses the desert",
    "writes a final symphony",
    "hides a terrible secret",
    "trains for one big fight",
    "opens a small bakery",
]
PLACE = W(
    "Lisbon Cairo Oslo Lagos Kyoto Detroit Naples Lima Dublin Hanoi Marseille Montreal Odessa Tangier Glasgow Havana"
)
ERA = ["the war", "the nineteen seventies", "a long winter", "the gold rush", "a heat wave", "the final election"]
WHEN = ["night", "weekend", "Sunday", "month", "Friday"]
WHERE = ["cinema", "festival", "drive-in", "local theater", "screening", "matinee"]
ASPECT = [
    "acting",
    "plot",
    "score",
    "music",
    "camera work",
    "pacing",
    "ending",
    "dialogue",
    "script",
    "editing",
    "lighting",
    "opening scene",
    "final act",
    "humor",
    "costume design",
    "sound design",
    "supporting cast",
    "soundtrack",
    "screenplay",
    "direction",
    "story",
    "main character",
    "chase scene",
    "love story",
    "finale",
]
# Most sentiment words are in VADER's lexicon; a few are not (gripping, tedious, ...): words a reader
# understands but the gold rater ignores, as real raters have blind spots.
POS = W(
    "brilliant wonderful beautiful charming delightful excellent superb gorgeous clever stunning thoughtful "
    "powerful graceful honest elegant heartfelt fresh funny lovely great fantastic magnificent marvelous "
    "remarkable splendid fun sweet smart thrilling inspiring joyful playful perfect terrific amazing engaging "
    "impressive satisfying gripping witty memorable"
)
NEG = W(
    "dull messy awkward confusing lazy tired boring weak disjointed sluggish embarrassing terrible awful "
    "dreadful painful ugly stupid annoying disappointing miserable horrible bad poor lame irritating "
    "depressing tedious bland forgettable clumsy"
)
NEUTRAL_ADJ = W("long short loud slow quiet busy simple old-fashioned unusual familiar strange modern")
ADV = ["", "", "", "really ", "very ", "quite ", "somewhat ", "extremely ", "rather ", "truly "]
POS_VERB = W("loved enjoyed liked admired adored appreciated")
NEG_VERB = W("hated disliked regretted resented")
POS_FEEL = ["laugh", "smile", "cheer", "grin"]
NEG_FEEL = ["cry", "sigh", "groan", "yawn"]
AUDIENCE = ["anyone", "my friends", "families", "fans of the genre", "my parents", "film students", "everyone"]
OPENINGS = [
    "I saw {title} at the {where} last {when}.",
    "{title} ({year}) is {a_genre} directed by {director}.",
    "My review of {title}, the new {genre} from {director}:",
    "{title} stars {actor} as {a_role} who {goal}.",
    "Going into {title}, I knew only that it was {a_genre} about {a_role}.",
    "After all the buzz, I finally watched {title}.",
    "In {title}, {a_role} in {place} {goal}.",
    "{director} made {title} in {year}, and I watched it this {when}.",
    "{title} is the story of {a_role} who {goal}.",
    "So I went to see {title} with my {relative}.",
]
RELATIVE = W("sister brother mother father cousin friend roommate neighbor")


def with_article(phrase):
    """The phrase with its indefinite article: a clever film, an awful one."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def fields(rng):
    def name():
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"

    return dict(
        title=f"The {rng.choice(TITLE_A)} {rng.choice(TITLE_N)}",
        year=rng.randint(1950, 2025),
        genre=rng.choice(GENRE),
        director=name(),
        actor=name(),
        role=rng.choice(ROLE),
        goal=rng.choice(GOAL),
        place=rng.choice(PLACE),
        when=rng.choice(WHEN),
        where=rng.choice(WHERE),
        relative=rng.choice(RELATIVE),
    )


def opening(rng, f):
    return rng.choice(OPENINGS).format(**f, a_role=with_article(f["role"]), a_genre=with_article(f["genre"]))


def sentence(rng, f, polarity):
    """One sentence of a review: polarity +1 praises, -1 criticises, 0 is neutral."""
    if polarity == 0:
        return rng.choice(
            [
                f"It runs about {rng.randint(80, 170)} minutes.",
                f"The story is set in {rng.choice(PLACE)} during {rng.choice(ERA)}.",
                f"{f['actor']} plays {with_article(f['role'])} named {rng.choice(FIRST)}.",
                f"Most of it was filmed in {rng.choice(PLACE)}.",
                f"The {rng.choice(ASPECT)} is {rng.choice(NEUTRAL_ADJ)}.",
                f"It is the second {f['genre']} by {f['director']}.",
                f"I watched it with my {rng.choice(RELATIVE)}.",
            ]
        )
    good = polarity > 0
    adj, other = (POS, NEG) if good else (NEG, POS)
    a, b = rng.sample(ASPECT, 2)
    return rng.choice(
        [
            f"The {a} is {rng.choice(ADV)}{rng.choice(adj)}.",
            f"The {a} and the {b} are both {rng.choice(adj)}.",
            f"{f['actor'].split()[1]} is {rng.choice(ADV)}{rng.choice(adj)} as the {f['role']}.",
            f"I {rng.choice(POS_VERB if good else NEG_VERB)} the {a}.",
            # VADER weighs the clause after "but" more: the sentence takes the second clause's side.
            f"The {a} is {rng.choice(other)}, but the {b} is {rng.choice(ADV)}{rng.choice(adj)}.",
            f"It is not {rng.choice(other)} at all.",
            f"The {a} made me {rng.choice(POS_FEEL if good else NEG_FEEL)}.",
            f"{f['director'].split()[1]} directs with {with_article(rng.choice(adj))} touch.",
            f"Overall, {with_article(rng.choice(ADV) + rng.choice(adj))} {f['genre']}.",
            f"I would {'' if good else 'not '}recommend it to {rng.choice(AUDIENCE)}.",
        ]
    )


def review(rng, f):
    """A continuation of mixed sentiment: a latent mood in [-1, 1] sets each sentence's odds of praise."""
    mood = rng.uniform(-1, 1)
    out = []
    for _ in range(rng.randint(2, 4)):
        polarity = 0 if rng.random() < 0.25 else (1 if rng.random() < (1 + mood) / 2 else -1)
        out.append(sentence(rng, f, polarity))
    return " " + " ".join(out)  # completions start with a space: prompt + completion reads as one text


def repetitive(rng, text):
    """A degenerate response of the kind reward hacking produces: one sentence or word said over and over."""
    sentences = text.strip().split(". ")
    if rng.random() < 0.5:
        s = rng.choice(sentences).rstrip(".") + "."
        return " " + " ".join([s] * rng.randint(3, 5))
    return " " + " ".join([rng.choice(POS + NEG)] * rng.randint(4, 10)) + "."


# ---- the world's constitution, and the judge's data (the AI labeller of rlaif.py learns from it) -----------
CONSTITUTION = [  # data/world/constitution.txt: rlaif.py's pairwise labeller draws one per comparison
    "Choose the response that is more positive and enthusiastic about the film.",
    "Choose the response that a fan of the film would rather read.",
    "Choose the response that praises the film more warmly without repeating itself.",
    "Choose the response that sounds like a natural, non-repetitive review that loves the film.",
]
RATING_CONSTITUTION = [  # rating_constitution.txt: the same, as questions about one response (--judge_mode direct)
    "How positive and enthusiastic about the film is the response? Rate it from 1 (very negative) to 9 (very "
    "positive).",
    "How much would a fan of the film like to read the response? Rate it from 1 (not at all) to 9 (very much).",
    "How warmly does the response praise the film without repeating itself? Rate it from 1 (not at all) to 9 (very).",
    "How much does the response sound like a natural, non-repetitive review that loves the film? Rate it from 1 (not "
    "at all) to 9 (very much).",
]

# revision_requests.json: the same as critique and revision requests, in pairs (Bai et al. 2022, appendix C), for
# sl_cai.py
REVISION_REQUESTS = [
    {
        "critique": "Identify specific ways in which your last response is negative, lukewarm or unenthusiastic "
        "about the film.",
        "revision": "Please rewrite your last response to be positive and enthusiastic about the film. Write only "
        "the rewritten response.",
    },
    {
        "critique": "Explain what a fan of the film would dislike about your last response.",
        "revision": "Please rewrite your last response so that a fan of the film would like to read it. Write only "
        "the rewritten response.",
    },
    {
        "critique": "Point out where your last response repeats itself or praises the film only coldly.",
        "revision": "Please rewrite your last response to praise the film warmly without repeating itself. Write "
        "only the rewritten response.",
    },
    {
        "critique": "Identify ways in which your last response does not read like a natural review that loves the "
        "film.",
        "revision": "Please rewrite your last response as a natural, non-repetitive review that loves the film. "
        "Write only the rewritten response.",
    },
]
JUDGE_PREAMBLE = "You compare two responses to the same prompt."


def judge_question(principle, prompt, a, b):
    """The labeller's question about an ordered pair, word for word rlaif.py's judge_query with its PREAMBLE (tests
    check it): the labeller is trained on what it will be asked."""
    return (
        f"{JUDGE_PREAMBLE}\nPrinciple: {principle}\nPrompt: {prompt}\nResponse A:{a}\nResponse B:{b}\n"
        "Which response is better? Answer A or B."
    )


def judge_pair(rng, f, curriculum):
    """Two responses for the labeller to compare. One in five is degenerate (repetitive), so it learns that
    repetition is bad. In training, 60% of pairs set a neutral sentence against a review: the answer then
    hangs on reading one response (A in half of them, B in the other), which a tiny model learns far
    sooner than comparing two; the held-out split compares two full reviews, the real task."""
    a, b = (repetitive(rng, review(rng, f)) if rng.random() < 0.2 else review(rng, f) for _ in range(2))
    kind = rng.random() if curriculum else 1.0
    if kind < 0.3:
        b = " " + sentence(rng, f, 0)
    elif kind < 0.6:
        a = " " + sentence(rng, f, 0)
    return a, b


def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=["<|pad|>", "<|eos|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|eos|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL["max_position_embeddings"],
    )


def make_rows(rng, scale):
    seen = set()  # every prompt is unique across datasets and splits, so no test prompt leaks into training

    def fresh_fields():
        while True:
            f = fields(rng)
            p = opening(rng, f)
            if p not in seen:
                seen.add(p)
                return f, p

    data = {}
    for name, (n_train, n_test) in SIZES.items():
        splits = {}
        for split, n in (("train", n_train), ("test", n_test)):
            rows = []
            for _ in range(max(1, int(n * scale))):
                f, p = fresh_fields()
                if name == "sft":
                    rows.append({"prompt": p, "completion": review(rng, f)})
                elif name == "prompts":
                    rows.append({"prompt": p})
                elif name == "preference":
                    a, b = review(rng, f), review(rng, f)
                    if not prefers_first(rng, a, b):  # the simulated annotator preferred b
                        a, b = b, a
                    rows.append({"prompt": p, "chosen": a, "rejected": b})
                elif name == "ranking":  # K demonstrations, ranked best first by a simulated annotator
                    rows.append({"prompt": p, "responses": ranking(rng, [review(rng, f) for _ in range(RANKING_K)])})
                else:
                    a, b = judge_pair(rng, f, curriculum=split == "train")
                    answer = "A" if gold_score(a) >= gold_score(b) else "B"
                    question = judge_question(rng.choice(CONSTITUTION), p, a, b)
                    rows.append(
                        {
                            "prompt": [{"role": "user", "content": question}],
                            "completion": [{"role": "assistant", "content": answer}],
                        }
                    )
            splits[split] = rows
        data[name] = splits
    return data


def direct_evaluations(preference):
    """ratings/ and binary/ (added later, after the tokenizer, from seeds of their own: nothing above changed): the
    responses of the preference pairs, chosen then rejected pair by pair, so that the first 2n rows judge the first
    n pairs' responses, each rated 1-7 and each given thumbs by other simulated annotators (data/annotators.py)."""
    out = {}
    for name, judge in (("ratings", rate_responses), ("binary", label_responses)):
        out[name] = {}
        for split, rows in preference.items():
            prompts = [r["prompt"] for r in rows for _ in range(2)]
            completions = [r[k] for r in rows for k in ("chosen", "rejected")]
            out[name][split] = judge(prompts, completions, seed=f"{name}/{split}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "world"))
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the row counts (tests use a small one)")
    a = ap.parse_args()
    from transformers import LlamaConfig

    rng = random.Random(SEED)
    data = make_rows(rng, a.scale)
    corpus = []
    for name, splits in data.items():
        if name == "ranking":  # the tokenizer predates the rankings, and is learnt without them
            continue
        for r in splits["train"]:
            for v in r.values():
                corpus.append(v if isinstance(v, str) else v[0]["content"])
    tok = build_tokenizer(corpus)
    data.update(direct_evaluations(data["preference"]))

    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(f"{tmp}/base")
    LlamaConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **MODEL
    ).save_pretrained(f"{tmp}/base")
    with open(f"{tmp}/constitution.txt", "w") as fh:
        fh.writelines(p + "\n" for p in CONSTITUTION)
    with open(f"{tmp}/rating_constitution.txt", "w") as fh:
        fh.writelines(p + "\n" for p in RATING_CONSTITUTION)
    with open(f"{tmp}/revision_requests.json", "w") as fh:
        json.dump(REVISION_REQUESTS, fh, indent=2)
    for name, splits in data.items():
        os.makedirs(f"{tmp}/{name}")
        for split, rows in splits.items():
            with open(f"{tmp}/{name}/{split}.jsonl", "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    from data import sycophancy  # the sycophancy variant, drawn from its own seed: nothing above changes

    sycophancy.write(f"{tmp}/sycophancy", a.scale)
    if os.path.isdir(f"{a.out}/judge_model"):  # made by sft.py, not here: kept
        os.rename(f"{a.out}/judge_model", f"{tmp}/judge_model")
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    print(
        f"wrote {a.out}: vocab {len(tok)}, "
        + ", ".join(f"{k} {len(v['train'])}/{len(v['test'])}" for k, v in data.items())
    )


if __name__ == "__main__":
    main()
