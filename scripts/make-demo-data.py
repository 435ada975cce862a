#!/usr/bin/env python3
"""Writes recipes/data/*.jsonl: the demo task, deterministically.

SFT teaches a skill (sort the letters of a word), ending each answer with
"." or "!" at random, so the SFT model has no preference between the two.
DPO then teaches a preference the SFT data left open: "!" over ".". So
held-out preference accuracy starts near chance after SFT and should rise
to about 1 after DPO, and greedy samples show the change.
"""
import json
import random
from pathlib import Path

LETTERS = "abcdefghij"
OUT = Path(__file__).resolve().parent.parent / "recipes" / "data"


def word(rng):
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def sft_rows(rng, n):
    for _ in range(n):
        w = word(rng)
        yield {"prompt": f"sort {w}:", "completion": " " + "".join(sorted(w)) + rng.choice(".!")}


def dpo_rows(rng, n):
    for _ in range(n):
        w = word(rng)
        answer = " " + "".join(sorted(w))
        yield {"prompt": f"sort {w}:", "chosen": answer + "!", "rejected": answer + "."}


def write(name, rows):
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write("sft_train.jsonl", sft_rows(random.Random(1), 2000))
    write("sft_eval.jsonl", sft_rows(random.Random(2), 200))
    write("dpo_train.jsonl", dpo_rows(random.Random(3), 1000))
    write("dpo_eval.jsonl", dpo_rows(random.Random(4), 200))
