"""Quantization and LoRA: close to full precision, a fresh adapter is a no-op, merging is exact,
adapters load in `peft`, QLoRA learns, 4-bit loading is small, and bad combinations are refused."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_gpt2, run_cli

from nanotune import GPT2, BertClassifier, load_tokenizer
from nanotune.lora import LoRAConfig, LoRALinear, adapters_off, add_lora, load_adapter, merge_lora
from nanotune.quantize import QuantConfig, footprint_bytes

GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


@pytest.fixture(scope="module")
def gpt2_64(tmp_path_factory, bpe_dir):
    """Wide enough (64) for bitsandbytes' 4-bit blocks of 64 weights."""
    return make_gpt2(tmp_path_factory.mktemp("gpt2-64"), bpe_dir, seed=5, n_embd=64, n_head=4, n_layer=2)


@pytest.fixture(scope="module")
def pretrained_gpt2_64(tmp_path_factory, gpt2_64):
    """gpt2_64 fully trained on the reviews first: a base that knows some English, so that
    adapters trained on the jokes have something to build on (a random base barely can)."""
    out = tmp_path_factory.mktemp("pretrained") / "out"
    r = run_cli("train.py", "--model", gpt2_64, "--data", "sentiment_train.csv", "--data", "sentiment_val.csv",
                "--val-split", 0, "--epochs", 10, "--lr", 1e-2, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def ids_for(folder):
    return torch.tensor([load_tokenizer(folder).encode("My grandmother keeps a spare key under the mat, under a rock.")])


@pytest.mark.parametrize("mode, tolerance", [("8bit", 0.02), ("4bit", 0.15)])
def test_quantized_forward_is_close_to_full_precision(gpt2_64, mode, tolerance):
    """Relative L2 error of the logits. int8 rounds each weight to 1/127 of its row's largest value
    (plus fp16 activations): well under 2 %. NF4 has 16 levels per block of 64: a single layer's
    output is off by ~9 % (measured), and errors partly average out over the network: 15 %."""
    ids = ids_for(gpt2_64)
    full = GPT2.from_pretrained(gpt2_64)
    quantized = GPT2.from_pretrained(gpt2_64, quantize=QuantConfig(mode))
    assert type(quantized.transformer.h[0].attn.c_attn).__name__ == ("Linear8bitLt" if mode == "8bit" else "Linear4bit")
    assert isinstance(quantized.lm_head, torch.nn.Linear) and quantized.lm_head.weight is quantized.transformer.wte.weight
    with torch.no_grad():
        a, b = full(ids), quantized(ids)
    assert ((a - b).norm() / a.norm()).item() < tolerance


def test_fresh_adapter_changes_nothing_and_merge_is_exact(gpt2_64):
    ids = ids_for(gpt2_64)
    base = GPT2.from_pretrained(gpt2_64)
    model = add_lora(GPT2.from_pretrained(gpt2_64), LoRAConfig(GPT2_TARGETS, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))              # B = 0
        for module in model.modules():                         # now a real update
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.05)
        unmerged = model(ids)
        layer = model.transformer.h[0].attn.c_attn
        expected_weight = layer.base_layer.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight   # alpha / r = 2
        merge_lora(model)
        merge_lora(model)                                      # safe to call twice
        assert torch.allclose(model.transformer.h[0].attn.c_attn.weight, expected_weight, atol=1e-6)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert (model(ids) - unmerged).abs().max() < 1e-5


def test_only_adapters_and_head_are_trainable(tiny_bert):
    model = add_lora(BertClassifier.from_pretrained(tiny_bert), LoRAConfig(("query", "value")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("classifier.") for n in trainable)
    assert {"classifier.weight", "classifier.bias"} <= trainable


def train_lora(model_dir, out, *extra):
    r = run_cli("train.py", "--model", model_dir, "--out", out, "--lora-r", 4, *extra)
    assert r.returncode == 0, r.stderr
    return r


def test_gpt2_adapter_loads_in_peft_with_equal_logits(tmp_path, gpt2_64):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    train_lora(gpt2_64, tmp_path / "out", "--data", "anecdotes_jokes.txt", "--epochs", 1, "--lr", 1e-2)
    assert json.loads((tmp_path / "out/adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    ids = ids_for(gpt2_64)
    ours = load_adapter(GPT2.from_pretrained(gpt2_64), tmp_path / "out").eval()
    ref = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_64), tmp_path / "out").eval()
    with torch.no_grad():
        trained = ours(ids)
        assert (trained - GPT2.from_pretrained(gpt2_64)(ids)).abs().max() > 1e-3      # the adapter learned something
        assert (trained - ref(ids).logits).abs().max() <= 1e-4


def test_bert_adapter_with_its_head_loads_in_peft(tmp_path, tiny_bert):
    from peft import PeftModel
    from transformers import BertForSequenceClassification
    train_lora(tiny_bert, tmp_path / "out", "--data", "sentiment_train.csv", "--val-data", "sentiment_val.csv", "--epochs", 1)
    tok = load_tokenizer(tiny_bert)
    ids, mask = tok(["The soup was cold.", "Lovely hotel, spotless rooms."])
    ours = load_adapter(BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]), tmp_path / "out").eval()
    ref = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(tiny_bert), tmp_path / "out").eval()
    with torch.no_grad():
        assert (ours(ids, mask) - ref(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-4


def test_qlora_gpt2_lowers_the_loss_and_merges_to_a_plain_model(tmp_path, pretrained_gpt2_64):
    from transformers import AutoModelForCausalLM
    base, out = pretrained_gpt2_64, tmp_path / "out"
    r = run_cli("train.py", "--model", base, "--data", "anecdotes_jokes.txt", "--out", out, "--quantize", "4bit",
                "--epochs", 3, "--lr", 1e-2, "--merge")
    assert r.returncode == 0, r.stderr
    assert "MiB in memory" in r.stdout
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses, evals = ([m["loss"] for m in log if m["event"] == kind] for kind in ("train", "eval"))
    assert train_losses[-1] < train_losses[0] - 0.2 and evals[-1] < evals[0]
    ours = merge_lora(load_adapter(GPT2.from_pretrained(base, quantize=QuantConfig("4bit")), out))
    ref = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = ids_for(base)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4
    gen = run_cli("generate.py", "--model", out, "--quantize", "4bit", "--prompt", "My dog", "--max-new-tokens", 5, "--seed", 1)
    assert gen.returncode == 0 and gen.stdout.startswith("My dog"), gen.stderr


def test_qlora_real_minilm_classifier_learns(tmp_path, minilm_dir):
    r = run_cli("train.py", "--model", minilm_dir, "--data", "sentiment_train.csv", "--val-data", "sentiment_val.csv",
                "--quantize", "4bit", "--lora-r", 8, "--epochs", 3, "--lr", 1e-3, "--batch-size", 16, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    final = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
    assert final["accuracy"] >= 0.75, final


PEAK_RSS = """
import sys
from nanotune import GPT2
from nanotune.quantize import QuantConfig, _bitsandbytes
_bitsandbytes()
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")          # restart the peak (VmHWM) from here
before = status("VmRSS:")
GPT2.from_pretrained(sys.argv[1], quantize=QuantConfig("4bit"))
print(status("VmHWM:") - before)
"""


def test_4bit_loading_stays_small(tmp_path, bpe_dir, monkeypatch):
    """Quantized while loading, tensor by tensor: never a full fp32 copy first. Measured two ways:
    the bytes of the model's tensors each time a checkpoint tensor arrives (exact), and the peak
    resident memory of a process that loads it (real; it includes bitsandbytes' temporaries and
    allocator slack, hence the looser bound)."""
    folder = make_gpt2(tmp_path / "m", bpe_dir, n_embd=768, n_head=12, n_layer=8, n_positions=128)
    fp32_bytes = footprint_bytes(GPT2.from_pretrained(folder))
    from nanotune import hub
    read, peaks, building = hub.iter_checkpoint, [], []
    def watched(f):
        for key, tensor in read(f):
            yield key, tensor
            peaks.append(footprint_bytes(building[0]) + tensor.numel() * tensor.element_size())
    real_init = GPT2.__init__
    def remember(self, config):
        real_init(self, config)
        building.append(self)
    monkeypatch.setattr(hub, "iter_checkpoint", watched)
    monkeypatch.setattr(GPT2, "__init__", remember)
    small = GPT2.from_pretrained(folder, quantize=QuantConfig("4bit"))
    assert max(peaks) <= 0.3 * fp32_bytes and footprint_bytes(small) <= 0.3 * fp32_bytes
    peak_rss = int(subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder)], capture_output=True, text=True,
                                  cwd=ROOT, check=True).stdout.split()[-1])
    assert peak_rss <= 0.5 * fp32_bytes, (peak_rss, fp32_bytes)


@pytest.mark.parametrize("args, pattern", [
    (["--quantize", "4bit", "--lora-r", "0"], "cannot be trained directly"),
    (["--lora-r", "4", "--lora-targets", "c_attn,query"], "--lora-targets query: no such linear layer.*choose from c_attn, c_fc, c_proj"),
    (["--quantize", "8bit", "--quantize-skip", "h"], "no linear layers to quantize"),
    (["--merge"], "--merge folds a LoRA adapter"),
])
def test_bad_combinations(tmp_path, tiny_gpt2, args, pattern):
    import re
    r = run_cli("train.py", "--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--out", tmp_path / "o", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and re.search(pattern, r.stderr), r.stderr


def test_adapters_off_gives_the_base_model_exactly(tiny_gpt2):
    model = GPT2.from_pretrained(tiny_gpt2).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = model(ids)
    add_lora(model, LoRAConfig(targets=("c_attn", "c_proj", "c_fc"), r=4, dropout=0.0))
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B.weight)              # a trained adapter: it changes the output
    assert not torch.equal(model(ids), base)
    with adapters_off(model):
        assert torch.equal(model(ids), base)
    assert not torch.equal(model(ids), base)                          # and back on after the block
