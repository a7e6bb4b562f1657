"""How the lm-eval tasks' data in this folder were made from the shipped data. Run it again to remake
them (deterministic): python data/lm_eval/make_tasks.py

jokes.jsonl: each joke of ../anecdotes_jokes.txt with two sentences or more, split into its setup
(every sentence but the last) and its ending (the last), beside three endings of other jokes; the
task (nanotune_jokes.yaml) asks which of the four the model finds the most likely.
sentiment_val.jsonl, sentiment_train.jsonl: the reviews of ../sentiment_*.csv; the task
(nanotune_sentiment.yaml) asks the model to write the review's sentiment as a word, with a few
training reviews shown first."""
import csv
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent
# A sentence ends at . ! or ? (and a closing quote), before a space and the next sentence's first letter.
SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]["\u201d]))\s+(?=["\u201c]?[A-Z])')


def split_joke(joke):
    sentences = SENTENCE_END.split(joke)
    if len(sentences) < 2:
        return None
    return " ".join(sentences[:-1]), sentences[-1]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(0)
    jokes = [line.strip() for line in (DATA / "anecdotes_jokes.txt").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    pairs = [p for p in map(split_joke, jokes) if p is not None]
    rows = []
    for i, (setup, ending) in enumerate(pairs):
        others = rng.sample([e for j, (_, e) in enumerate(pairs) if j != i and e != ending], 3)
        label = rng.randrange(4)
        endings = others[:label] + [ending] + others[label:]
        rows.append({"setup": setup, "endings": endings, "label": label})
    write_jsonl(HERE / "jokes.jsonl", rows)
    for split in ("val", "train"):
        with open(DATA / f"sentiment_{split}.csv", encoding="utf-8", newline="") as f:
            write_jsonl(HERE / f"sentiment_{split}.jsonl", [{"text": r["text"], "label": r["label"]}
                                                          for r in csv.DictReader(f)])
    print(f"{len(rows)} jokes, sentiment: the val and train reviews")


if __name__ == "__main__":
    main()
