"""Generate the bundled demo data in finetune/assets/data/{clm,cls,qa}/{train,validation}.jsonl.

Deterministic (fixed seeds; rerunning rewrites identical files). The data is synthetic and made to be learnable
by a tiny random-init GPT-J on CPU in a minute or two, so that a broken pipeline shows (metrics stay at chance)
while a working one clearly learns:

- clm: counting runs ("Counting from 17: 17 18 19 ...") and letter runs, whose next token follows from the
  previous one, plus templated sentences; perplexity falls far below that of random text.
- cls: short reviews whose label (negative / neutral / positive) follows from one adjective.
- qa: "The box has red, tiger and zinc." / "Which animal does the box have?" -> "tiger". The context never
  names the kinds, so the answer depends on the question (3-4 candidates: about 30% exact match without it);
  answers are single tokens. A tiny GPT-J reaches ~90-100 EM in 200-300 steps (batch 8-16, lr 2e-3).

Usage: python scripts/make_bundled_data.py [--out finetune/assets/data]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from finetune.model.tokenizer import GPTJTokenizer

SIZES = {"train": 1000, "validation": 100}
SEEDS = {"train": 1, "validation": 2}

# Kinds of things -> words of that kind (disjoint; each word is one GPT-2 token after a space).
WORDS = {
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
    "animal": ["tiger", "horse", "eagle", "wolf", "rabbit", "snake", "bear", "fox", "whale", "lion"],
    "fruit": ["apple", "banana", "cherry", "lemon", "mango", "peach", "grape", "lime", "plum", "pear"],
    "metal": ["iron", "copper", "silver", "zinc", "tin", "nickel", "steel", "lead", "aluminum", "bronze"],
    "capital": ["Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Cairo", "Moscow", "Boston", "Dublin"],
    "instrument": ["piano", "guitar", "violin", "drum", "sax", "bell", "trumpet", "organ", "bass", "horn"],
    "sport": ["tennis", "soccer", "golf", "hockey", "rugby", "chess", "boxing", "cricket", "baseball", "cycling"],
}
# qa: few kinds and words, so that the tiny model learns to match kinds within the default 300 steps.
QA_KINDS = {kind: WORDS[kind][:6] for kind in ("animal", "color", "fruit", "metal")}
PLACES = ["box", "bag", "room", "cart", "shop", "house"]

# cls: the adjective decides the label.
ADJECTIVES = {
    "positive": ["wonderful", "great", "excellent", "lovely", "amazing", "fantastic", "delightful", "superb"],
    "negative": ["terrible", "awful", "horrible", "boring", "dreadful", "poor", "disappointing", "bad"],
    "neutral": ["ordinary", "average", "acceptable", "typical", "standard", "plain", "adequate", "regular"],
}
NOUNS = ["movie", "meal", "hotel", "book", "concert", "service", "game", "trip", "show", "room", "album", "class"]
REVIEW_TEMPLATES = [
    "The {noun} was {adj}.",
    "I thought the {noun} was {adj}.",
    "Honestly, the {noun} felt {adj} to me.",
    "We went last week and the {noun} was {adj}.",
    "My friend said the {noun} is {adj}, and I agree.",
    "Overall a {adj} {noun}.",
]
CLM_TEMPLATES = [
    "The {color} {animal} eats a {fruit} in {capital}.",
    "In {capital}, people play {sport} and the {instrument}.",
    "A {animal} made of {metal} stands near the {color} gate.",
]


def qa_example(rng: random.Random, index: int, split: str) -> dict:
    place = rng.choice(PLACES)
    kinds = rng.sample(sorted(QA_KINDS), rng.randint(3, 4))
    values = [rng.choice(QA_KINDS[kind]) for kind in kinds]
    # The context never names the kinds: only the question does, so the model has to match the question's word
    # ("animal") against the kind of each listed word ("tiger"); without the question it is right 1 time in 3-4.
    context = f"The {place} has {', '.join(values[:-1])} and {values[-1]}."
    asked = rng.randrange(len(kinds))
    start = context.index(f" {values[asked]}") + 1
    return {
        "id": f"{split}-{index:04d}",
        "title": place,
        "context": context,
        "question": f"Which {kinds[asked]} does the {place} have?",
        "answers": {"text": [values[asked]], "answer_start": [start]},
    }


def cls_example(rng: random.Random) -> dict:
    label = rng.choice(sorted(ADJECTIVES))
    text = rng.choice(REVIEW_TEMPLATES).format(noun=rng.choice(NOUNS), adj=rng.choice(ADJECTIVES[label]))
    return {"text": text[0].upper() + text[1:], "label": label}


def clm_example(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.4:
        start = rng.randint(1, 80)
        numbers = " ".join(str(n) for n in range(start, start + rng.randint(8, 16)))
        return {"text": f"Counting from {start}: {numbers}."}
    if kind < 0.6:
        start = rng.randint(0, 12)
        return {"text": "Letters: " + " ".join(chr(ord("a") + i) for i in range(start, start + rng.randint(6, 13))) + "."}
    sentences = [
        rng.choice(CLM_TEMPLATES).format(**{kind: rng.choice(words) for kind, words in WORDS.items()})
        for _ in range(rng.randint(2, 4))
    ]
    return {"text": " ".join(sentences)}


def check(tokenizer: GPTJTokenizer) -> None:
    """The qa answers must be single tokens after a space (so exact match hinges on one start/end pair)."""
    for words in WORDS.values():
        for word in words:
            assert len(tokenizer.encode(" " + word)) == 1, f"{word!r} is not a single GPT-2 token"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "finetune/assets/data")
    args = parser.parse_args()
    tokenizer = GPTJTokenizer.from_pretrained(None)
    check(tokenizer)
    for split, size in SIZES.items():
        makers = {
            "clm": lambda rng, i: clm_example(rng),
            "cls": lambda rng, i: cls_example(rng),
            "qa": lambda rng, i: qa_example(rng, i, split),
        }
        for task, make in makers.items():
            rng = random.Random(f"{task}-{SEEDS[split]}")
            rows = [make(rng, i) for i in range(size)]
            path = args.out / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            longest = max(len(tokenizer.encode(row.get("context", row.get("text")))) for row in rows)
            print(f"{path}: {len(rows)} rows, longest text {longest} tokens")


if __name__ == "__main__":
    main()
