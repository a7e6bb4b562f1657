"""The reward for data/arithmetic.jsonl: is the answer's number right?

    python train.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data arithmetic.jsonl \\
        --val-data arithmetic_val.jsonl --reward data/arithmetic_reward.py:correct --lora-r 16

A reward function takes the prompt, the model's answer (text) and the data row's other fields as
keywords (here `answer`), and returns a number.
"""
import re


def correct(prompt, completion, answer, **fields):
    """1 if the first number in the answer is the right one, else 0: the question asks for the
    number only, so a reply that starts by repeating the question's numbers does not count."""
    numbers = re.findall(r"-?\d+", completion)
    return 1.0 if numbers and int(numbers[0]) == answer else 0.0
