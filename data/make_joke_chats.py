"""How data/joke_chats.jsonl was made from data/anecdotes_jokes.txt: for each joke, a user asks for a
joke about something the joke is about, and the assistant answers with the joke. Run it again to
remake the file (deterministic): python data/make_joke_chats.py"""
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What a joke can be about, most telling first: the first of these a joke mentions is its topic.
TOPICS = ["cat", "dog", "parrot", "fish", "cow", "horse", "chicken", "penguin", "scarecrow", "snow", "weather",
          "doctor", "dentist", "teacher", "baker", "librarian", "fisherman", "postman", "lawyer", "waiter", "pilot",
          "grandmother", "grandfather", "mother", "father", "uncle", "aunt", "son", "daughter", "wife", "husband",
          "neighbour", "friend", "tourist", "library", "museum", "restaurant", "school", "office", "village", "shop",
          "bread", "soup", "coffee", "breakfast", "music", "book", "clock", "car", "train", "computer", "phone",
          "garden", "tournament", "party", "birthday", "christmas", "sign", "money", "holiday", "sleep", "time"]
ASK = ["Tell me a joke about {}.", "Do you know a joke about {}?", "Make me laugh with something about {}.",
       "Got a funny story about {}?"]
PLURAL = {"fish": "fish", "snow": "snow", "weather": "the weather", "bread": "bread", "soup": "soup", "coffee": "coffee",
          "breakfast": "breakfast", "music": "music", "money": "money", "sleep": "sleep", "time": "time",
          "christmas": "Christmas", "library": "libraries", "party": "parties", "penguin": "penguins", "wife": "wives",
          "fisherman": "fishermen", "postman": "postmen"}
NOT_A_TOPIC = {"because", "something", "everything", "nothing", "anything", "about", "would", "could", "should",
               "their", "there", "which", "another", "always", "never", "after", "before", "every", "still", "thought",
               "instead", "haven", "broken", "possible", "wrong", "shortest", "cheapest", "sticky", "facial"}


def topic(joke):
    words = re.findall(r"[a-z]+", joke.lower())
    for t in TOPICS:
        if t in words or t + "s" in words:
            return PLURAL.get(t, t + "s")
    nouns = [w for w in words if len(w) > 4 and w not in NOT_A_TOPIC and not w.endswith(("ed", "ing", "ly", "s"))]
    return max(nouns, key=len, default="life")


def main():
    rng = random.Random(0)
    jokes = [line.strip() for line in (HERE / "anecdotes_jokes.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(HERE / "joke_chats.jsonl", "w", encoding="utf-8") as f:
        for joke in jokes:
            messages = [{"role": "user", "content": rng.choice(ASK).format(topic(joke))},
                        {"role": "assistant", "content": joke}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
