"""How data/arithmetic.jsonl and data/arithmetic_val.jsonl were made: short sums and differences
with their answers, a task whose reward a program can check (data/arithmetic_reward.py). The two
files share no question. Run it again to remake them (deterministic): python data/make_arithmetic.py"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def question(rng):
    a, b = rng.randint(2, 30), rng.randint(2, 9)
    if rng.random() < 0.5:
        return f"What is {a} + {b}? Reply with the number only.", a + b
    a, b = max(a, b), min(a, b)                 # no negative answers
    return f"What is {a} - {b}? Reply with the number only.", a - b


def main():
    rng, seen, rows = random.Random(0), set(), []
    while len(rows) < 288:
        prompt, answer = question(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": answer})
    for name, part in (("arithmetic.jsonl", rows[:256]), ("arithmetic_val.jsonl", rows[256:])):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


if __name__ == "__main__":
    main()
