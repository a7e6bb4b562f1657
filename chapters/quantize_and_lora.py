"""Quantization and LoRA (QLoRA): store GPT-2's linear layers in 4 (or 8) bits, train small
adapters beside them with chapter 1's loop, then fold the adapters back into plain weights.

    python chapters/quantize_and_lora.py                    # gpt2 from the Hub (or its local cache)
    python chapters/quantize_and_lora.py --quantize 8bit

Five steps, top to bottom: load the model in full precision; swap each linear layer for a
bitsandbytes 8-bit or 4-bit one (`quantize.quantize_linears`), and measure what that saves and
what it costs (memory before and after; the logits and the held-out loss against the full model);
add LoRA adapters (`lora.add_lora`: the quantized weights stay frozen, only the adapters train);
train them with chapter 1's loop; merge them into de-quantized weights (`lora.merge_lora`), a plain
model again. The numbers are the `qlora` row of nanotune/recipes.py (`train.py --recipe qlora`).
tests/test_chapters.py checks that `step` computes the same loss and gradients as train.py's.
"""
import argparse
import random

import torch

from nanotune import GPT2, load_tokenizer
from nanotune.data import batch_order, lm_sequences, make_batch, read_examples
from nanotune.evaluate import evaluate
from nanotune.lora import DEFAULT_TARGETS, LoRAConfig, add_lora, merge_lora
from nanotune.losses import causal_lm_loss
from nanotune.quantize import QuantConfig, footprint_bytes, quantize_linears
from nanotune.recipes import RECIPES

RECIPE = RECIPES["qlora"]


def step(model, optimizer, batch):
    """Chapter 1's step. The gradient flows back through the frozen quantized layers (each
    de-quantizes its weight for the product) and stops at the adapters, the only weights that train."""
    loss = causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def mib(model):
    return footprint_bytes(model) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help="Hub id or folder of a GPT-2 checkpoint")
    p.add_argument("--data", default="data/anecdotes_jokes.txt")
    p.add_argument("--quantize", choices=["8bit", "4bit"], default=RECIPE["quantize"])
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"     # bitsandbytes runs on both

    # 1. The pre-trained model in full precision, and the jokes, a tenth held out to measure on.
    model = GPT2.from_pretrained(args.model, device=device)
    tokenizer = load_tokenizer(args.model)
    texts = [example["text"] for example in read_examples(args.data)]
    random.Random(0).shuffle(texts)
    held = max(1, len(texts) // 10)
    max_length = min(RECIPE["max_length"], model.config.context)
    sequences, labels, _ = lm_sequences(tokenizer.encode_batch(texts[held:]), max_length, tokenizer.eos_id)
    held_ids, held_labels, _ = lm_sequences(tokenizer.encode_batch(texts[:held]), max_length, tokenizer.eos_id)
    probe = make_batch("lm", held_ids, held_labels, range(min(8, len(held_ids))), tokenizer.pad_id, device)

    def held_out_loss():
        return evaluate(model, "lm", held_ids, held_labels, RECIPE["batch_size"], tokenizer.pad_id, device)["loss"]

    model.eval()
    with torch.no_grad():
        full_logits = model(probe["input_ids"], probe["attention_mask"])
    full_loss, full_mib = held_out_loss(), mib(model)

    # 2. Swap the linear layers for quantized ones: 8-bit keeps each weight as an integer times its
    # row's scale (LLM.int8); 4-bit NF4 as one of 16 levels placed where normally distributed
    # weights fall, with a scale for every block of 64. The output layer is GPT-2's token embedding
    # and stays in full precision (quantize.targets).
    quant = QuantConfig(args.quantize, RECIPE["quant_type"])
    quantize_linears(model, quant)
    with torch.no_grad():
        quant_logits = model(probe["input_ids"], probe["attention_mask"])
    quant_loss = held_out_loss()
    mask = probe["attention_mask"].bool()                                # real tokens only
    print(f"memory: {full_mib:.2f} MiB in full precision, {mib(model):.2f} MiB with {args.quantize} linears"
          f" ({mib(model) / full_mib:.0%})")
    print(f"fidelity: logits differ by at most {(quant_logits - full_logits)[mask].abs().max():.4f}; held-out loss"
          f" {full_loss:.4f} in full precision, {quant_loss:.4f} quantized ({quant_loss - full_loss:+.4f})")

    # 3. LoRA beside each quantized layer: y = W x + (alpha / r) B A x, with W frozen. B starts at
    # zero, so the adapted model begins exactly as the quantized one.
    add_lora(model, LoRAConfig(DEFAULT_TARGETS["gpt2"], RECIPE["lora_r"], RECIPE["lora_alpha"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"LoRA: {sum(p.numel() for p in trainable):,} trainable weights, beside"
          f" {sum(p.numel() for p in model.parameters() if not p.requires_grad):,} frozen ones")

    # 4. Chapter 1's loop, on the adapters only. A higher rate than chapter 1's 5e-5: the adapters
    # start from zero, not from good pre-trained values.
    optimizer = torch.optim.Adam(trainable, lr=RECIPE["lr"])
    print(f"settings: lr={optimizer.defaults['lr']} epochs={args.epochs} batch_size={RECIPE['batch_size']}"
          f" quantize={args.quantize} lora_r={RECIPE['lora_r']} lora_alpha={RECIPE['lora_alpha']}")
    for epoch in range(args.epochs):
        model.train()
        losses = [step(model, optimizer, make_batch("lm", sequences, labels, indices, tokenizer.pad_id, device))
                  for indices in batch_order(len(sequences), RECIPE["batch_size"], seed=0, epoch=epoch)]
        model.eval()
        print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}, held-out loss {held_out_loss():.4f}")

    # 5. Merge: each layer becomes one plain linear layer, W (de-quantized) + (alpha / r) B A. The
    # model is full precision again, ready to save in the Hub layout or to quantize once more.
    adapted = held_out_loss()
    merge_lora(model)
    print(f"merged: {mib(model):.2f} MiB, plain linear layers; held-out loss {held_out_loss():.4f}"
          f" (with the adapters: {adapted:.4f})")


if __name__ == "__main__":
    main()
