"""Data for recipes/smollm2.toml (standard library only, seeded: the same
files every run).

- sft_train / sft_eval: writing a word three times, separated by commas
  ("house" -> "house, house, house"), an answer format SmolLM2-135M-Instruct
  does not produce (asked plainly, it explains the word instead; a run of
  hyphenated spelling taught in 60 steps stayed at 0% exact match on a
  135M model). Evaluation words are not in the training set. Completions end
  in "." or "!" at random, so the SFT data leaves that choice open.
- dpo_train / dpo_eval: the same task, preferring the "!" ending: a
  preference SFT did not teach.
- general: ordinary questions the base model already answers; their loss
  before and after each scheme is what the fine-tuning cost.

    python3 scripts/make-smollm2-data.py recipes/data/smollm2
"""

import json
import random
import sys
from pathlib import Path

WORDS = """
apple house water light music table chair green river stone paper money
happy friend dream smile world heart bread cloud plant horse mouse tiger
snake eagle whale shark honey sugar lemon grape mango peach cherry melon
bottle window garden flower forest island valley desert ocean planet rocket
engine bridge castle tower church school market street coffee butter cheese
pepper salt onion carrot potato tomato orange yellow purple silver golden
winter summer spring autumn monday friday morning evening night moon star
sun rain snow storm wind fire earth metal glass wood brick sand dust smoke
doctor teacher farmer artist writer singer player driver pilot sailor king
queen prince lady child father mother sister brother uncle family people
animal bird fish frog bear wolf lion zebra camel rabbit monkey donkey kitten
puppy letter number circle square corner center middle bottom button pocket
jacket shirt dress shoes boots glove scarf ring watch phone camera screen
""".split()
GENERAL = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Germany?", "Berlin."),
    ("What is the capital of Spain?", "Madrid."),
    ("What is the largest planet in the solar system?", "Jupiter."),
    ("What planet is known as the red planet?", "Mars."),
    ("What is the chemical symbol for water?", "H2O."),
    ("What gas do plants absorb from the air?", "Carbon dioxide."),
    ("How many days are in a week?", "Seven."),
    ("How many legs does a spider have?", "Eight."),
    ("What color is the sky on a clear day?", "Blue."),
    ("What do bees make?", "Honey."),
    ("What is the freezing point of water in Celsius?", "Zero degrees."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare."),
    ("What is the opposite of hot?", "Cold."),
    ("What animal is known as the king of the jungle?", "The lion."),
    ("What is the tallest animal?", "The giraffe."),
    ("What language is spoken in Brazil?", "Portuguese."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
    ("How many continents are there?", "Seven."),
    ("What is the boiling point of water in Celsius?", "100 degrees."),
    ("What fruit keeps the doctor away?", "An apple a day."),
    ("What is the main ingredient of bread?", "Flour."),
]


def spell_row(word):
    return f"Write the word three times: {word}\nAnswer:", " " + ", ".join([word] * 3)


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/data/smollm2")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(24)

    def write(name, rows):
        with open(out / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    words = sorted(set(WORDS))
    rng.shuffle(words)
    held_out, train = words[:40], words[40:]

    def sft(pool, n):
        rows = []
        for i in range(n):
            prompt, answer = spell_row(pool[i % len(pool)] if n <= len(pool) else rng.choice(pool))
            rows.append({"prompt": prompt, "completion": answer + rng.choice(".!")})
        return rows

    def dpo(pool, n):
        rows = []
        for i in range(n):
            prompt, answer = spell_row(pool[i % len(pool)] if n <= len(pool) else rng.choice(pool))
            rows.append({"prompt": prompt, "chosen": answer + "!", "rejected": answer + "."})
        return rows

    write("sft_train.jsonl", sft(train, 600))
    write("sft_eval.jsonl", sft(held_out, 40))
    write("dpo_train.jsonl", dpo(train, 300))
    write("dpo_eval.jsonl", dpo(held_out, 40))
    write("general.jsonl", [{"prompt": f"Question: {q}\nAnswer:", "completion": " " + a} for q, a in GENERAL])


if __name__ == "__main__":
    main()
