"""How data/joke_pairs.jsonl was made from data/joke_chats.jsonl (itself made from the shipped
data/anecdotes_jokes.txt): preference pairs in TRL's conversational format. The prompt is the user's
request; the chosen answer is the real joke; the rejected one is the same joke's setup with the
punchline (last sentence) of another joke, picked at random, so it no longer lands; a one-sentence
joke is rejected in favour of another whole joke, which is about something else than was asked.
Every tenth pair goes to data/joke_pairs_val.jsonl instead, held out to measure a run on pairs it
never trained on. Run it again to remake both files (deterministic): python data/make_joke_pairs.py"""
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sentences(text):
    return re.split(r'(?:(?<=[.!?])|(?<=[.!?]"))\s+(?=["A-Z])', text.strip())


def main():
    rng = random.Random(0)
    lines = (HERE / "joke_chats.jsonl").read_text(encoding="utf-8").splitlines()
    chats = [json.loads(line)["messages"] for line in lines]
    jokes = [messages[1]["content"] for messages in chats]
    with open(HERE / "joke_pairs.jsonl", "w", encoding="utf-8") as train, \
            open(HERE / "joke_pairs_val.jsonl", "w", encoding="utf-8") as val:
        for i, (ask, answer) in enumerate(chats):
            other = jokes[rng.choice([j for j in range(len(jokes)) if j != i])]
            parts = sentences(answer["content"])
            rejected = " ".join(parts[:-1] + sentences(other)[-1:]) if len(parts) > 1 else other
            if rejected == answer["content"]:
                continue
            row = {"prompt": [ask], "chosen": [answer], "rejected": [{"role": "assistant", "content": rejected}]}
            (val if i % 10 == 9 else train).write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
