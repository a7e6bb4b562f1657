"""The reward for data/arithmetic.jsonl: is the answer's number right?

    python train.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data arithmetic.jsonl \\
        --val-data arithmetic_val.jsonl --reward data/arithmetic_reward.py:correct --lora-r 16

A reward function takes the prompt, the model's answer (text) and the data row's other fields as
keywords (here `answer`), and returns a number.
"""
import re


def correct(prompt, completion, answer, **fields):
    """1 if the last number in the answer is the right one, else 0. A small model tends to write the
    sum out ("7 + 5 = 12"): the result comes last. An answer cut off by --max-new-tokens before the
    result scores 0, so a short budget also rewards getting to the point."""
    numbers = re.findall(r"-?\d+", completion)
    return 1.0 if numbers and int(numbers[-1]) == answer else 0.0
