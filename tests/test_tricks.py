"""Every speed trick computes what its plain, textbook twin computes (nanotune/tricks.py lists
them): a whole training step of GPT-2 and BERT, greedy generation, and each twin on its own at
the shapes that matter. And `--plain` runs the textbook path end to end."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli

import train
from nanotune import GPT2, BertClassifier, bert, gpt2, load_tokenizer, plain, tricks
from nanotune.data import classify_batch, lm_batch
from nanotune.dropout import Dropout
from nanotune.generation import generate, next_tokens
from nanotune.losses import causal_lm_loss_sum
from nanotune.quantize import QuantConfig

TEXTS = ["A man walks into a library and asks for books about paranoia.", "Why?",
         "My grandmother keeps a spare key under the mat, under a rock, under the dog."]


def without_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attn_pdrop"):
            m.attn_pdrop = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    return model.train()


def one_step(load, batch, task):
    """Loss and gradients of one training step, as train.py computes them."""
    torch.manual_seed(0)                    # the same new classifier head each time
    model = without_dropout(load())
    total = train.loss_sum(model, batch, task)
    total.backward()
    return total.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_a_training_step_fast_equals_plain(tiny_gpt2, tiny_bert, minilm_dir, task):
    """GPT-2 (chunked loss, fused attention) and BERT (fused attention), fp32, padded batches."""
    if task == "lm":
        tok = load_tokenizer(tiny_gpt2)
        batch = lm_batch([ids + [tok.eos_id] for ids in tok.encode_batch(TEXTS)], tok.pad_id)
        models = [lambda: GPT2.from_pretrained(tiny_gpt2)]
    else:
        tok = load_tokenizer(minilm_dir)
        batch = classify_batch(tok.encode_batch(TEXTS), [0, 1, 1], tok.pad_id)
        models = [lambda folder=folder: BertClassifier.from_pretrained(folder, labels=["a", "b"]) for folder in (tiny_bert, minilm_dir)]
    assert batch["attention_mask"] is not None and not bool(batch["attention_mask"].all())    # padding is exercised
    for load in models:
        fast_loss, fast_grads = one_step(load, batch, task)
        with plain():
            plain_loss, plain_grads = one_step(load, batch, task)
        assert abs(fast_loss - plain_loss) <= 1e-6 * abs(plain_loss)
        assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 10
        for name in plain_grads:
            assert (fast_grads[name] - plain_grads[name]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])       # the gradients clipped, and left alone
def test_clipping_inside_adamw_equals_clipping_then_stepping(tiny_gpt2, max_norm):
    """train.train_step with the clip_in_adamw trick and without it: the same norm, the same
    weights and moments after three steps of the fused AdamW that train.py makes."""
    from nanotune.optim import make_optimizer
    tok = load_tokenizer(tiny_gpt2)
    batch = lm_batch([ids + [tok.eos_id] for ids in tok.encode_batch(TEXTS)], tok.pad_id)
    results = []
    for trick in (True, False):
        model = without_dropout(GPT2.from_pretrained(tiny_gpt2))
        optimizer = make_optimizer(model, 1e-2, 0.1)
        assert tricks.clips_inside_adamw(optimizer)
        with plain([] if trick else ["clip_in_adamw"]):
            norms = [train.train_step(model, [batch], optimizer, 1e-2, "lm",
                                      max_norm, torch.device("cpu"))[2] for _ in range(3)]
        results.append((torch.stack(norms), dict(model.named_parameters()), optimizer.state_dict()["state"]))
    (fast_norms, fast_weights, fast_moments), (plain_norms, plain_weights, plain_moments) = results
    assert torch.allclose(fast_norms, plain_norms, rtol=1e-5) and bool((plain_norms > max_norm).all()) == (max_norm < 1)
    for name in plain_weights:
        assert torch.allclose(fast_weights[name], plain_weights[name], rtol=1e-5, atol=1e-7), name
    for i in plain_moments:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(fast_moments[i][moment], plain_moments[i][moment], rtol=1e-4, atol=1e-12), (i, moment)


@pytest.mark.parametrize("task", ["lm", "packed", "classify"])
def test_a_batch_padded_to_a_multiple_of_8_gives_the_same_loss_and_gradients(tiny_gpt2, tiny_bert, task):
    from nanotune.data import pack_examples
    if task == "classify":
        tok, load = load_tokenizer(tiny_bert), lambda: BertClassifier.from_pretrained(tiny_bert, labels=["a", "b"])
        batch = classify_batch(tok.encode_batch(TEXTS), [0, 1, 1], tok.pad_id)
    else:
        tok, load = load_tokenizer(tiny_gpt2), lambda: GPT2.from_pretrained(tiny_gpt2)
        ids = [s + [tok.eos_id] for s in tok.encode_batch(TEXTS)]
        blocks, labels = pack_examples(ids, ids, 61) if task == "packed" else (ids, None)
        batch = lm_batch(blocks, tok.pad_id, labels)
    width = batch["input_ids"].shape[1]
    wider = tricks.padded_to_multiple(batch, tok.pad_id, limit=64)
    assert wider["input_ids"].shape[1] == min(-(-width // 8) * 8, 64) > width
    assert tricks.padded_to_multiple(batch, tok.pad_id, limit=width)["input_ids"].shape[1] == width   # the context
    lm = "classify" if task == "classify" else "lm"
    (loss, grads), (wider_loss, wider_grads) = one_step(load, batch, lm), one_step(load, wider, lm)
    assert abs(loss - wider_loss) <= 1e-5 * abs(loss)
    for name in grads:
        assert (grads[name] - wider_grads[name]).abs().max() <= 1e-5, name


def test_greedy_generation_fast_equals_plain(tiny_gpt2):
    """The KV-cached, packed decoding loop picks the tokens the plain loop picks, batched with padding."""
    model, tok = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    prompts = [tok.encode(t) for t in TEXTS]
    fast = generate(model, prompts, 30, tok.pad_id, tok.eos_id, temperature=0, repetition_penalty=1.3)
    with plain():
        slow = generate(model, prompts, 30, tok.pad_id, tok.eos_id, temperature=0, repetition_penalty=1.3)
    assert fast == slow and sum(map(len, fast)) > 30


@pytest.mark.parametrize("T", [3, 4, 11])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_in_blocks_equals_the_plain_formula(T, padded):
    """Blocks of 4 queries, with T shorter than, equal to and longer than a block (the last block
    shorter), with and without padding: the values and the q, k, v gradients of the plain formula
    (dropout rounded to nothing in the twin: 1e-6 x 65,536 levels rounds to 0)."""
    q, k, v = (torch.randn(2, 3, T, 4, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3))
    padding = torch.ones(2, T, dtype=torch.long)
    if padded:
        padding[0, :T // 2] = 0
    mask = gpt2.attention_mask_for(padding, T, 0, "cpu") if padded else tricks.causal_mask(T, T, "cpu")
    assert_same_values_and_gradients(q, k, v, lambda: tricks.causal_attention_in_blocks(q, k, v, mask, 1e-6, block=4),
                                     lambda: plain_gpt2_attention(q, k, v, mask if padded else None))


def assert_same_values_and_gradients(q, k, v, fast, textbook):
    grad_y = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    results = []
    for attend in (fast, textbook):
        y = attend()
        q.grad = k.grad = v.grad = None
        y.backward(grad_y)
        results.append([y, q.grad, k.grad, v.grad])
    for ours, plain_one in zip(*results):
        torch.testing.assert_close(ours, plain_one, rtol=0, atol=1e-5)


def plain_gpt2_attention(q, k, v, mask, dropout_p=0.0):
    with plain(["attention"]):
        return gpt2.attention(q, k, v, mask, dropout_p)


@pytest.mark.parametrize("T, past, padded", [(6, 0, False), (6, 0, True), (1, 5, False), (1, 5, True), (3, 4, False)])
def test_fused_attention_equals_the_plain_formula(T, past, padded):
    """GPT-2's fused path: a whole sequence, one new token over a cache, several over a cache."""
    S = past + T
    q, k, v = (torch.randn(2, 3, n, 4, generator=torch.Generator().manual_seed(i)) for i, n in enumerate((T, S, S)))
    padding = torch.ones(2, S, dtype=torch.long)
    padding[1, :2] = 0
    mask = gpt2.attention_mask_for(padding, T, past, "cpu") if padded else None
    torch.testing.assert_close(tricks.causal_attention(q, k, v, mask, 0.0), plain_gpt2_attention(q, k, v, mask), rtol=0, atol=1e-6)


def test_bert_fused_attention_equals_the_plain_formula():
    q, k, v = (torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()[:, None, None, :]
    with plain(["attention"]):
        textbook = bert.attention(q, k, v, mask, 0.0)
    torch.testing.assert_close(tricks.attention(q, k, v, mask, 0.0), textbook, rtol=0, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_bert_attention_with_dropout_equals_the_plain_formula(padded):
    """BERT's CPU training path (dropout rounded to nothing, as above): values and q, k, v gradients."""
    q, k, v = (torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()[:, None, None, :] if padded else None
    assert_same_values_and_gradients(q, k, v, lambda: tricks.attention(q, k, v, mask, 1e-6), lambda: plain_bert_attention(q, k, v, mask))


def plain_bert_attention(q, k, v, mask):
    with plain(["attention"]):
        return bert.attention(q, k, v, mask, 0.0)


# ---- dropout_mask -----------------------------------------------------------------------------

@pytest.mark.parametrize("use_trick", [True, False])
def test_dropout_keeps_the_expected_value(use_trick):
    """Both dropouts: the right share kept, kept values scaled by 1 / (1 - p), gradient = mask x scale."""
    x = torch.ones(1000, 1000, requires_grad=True)
    layer = Dropout(0.1) if use_trick else torch.nn.Dropout(0.1)
    y = layer.train()(x)
    assert abs((y != 0).float().mean().item() - 0.9) < 0.002      # 1e6 draws: the standard error is 0.0003
    assert abs(y.mean().item() - 1.0) < 0.003
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert layer.eval()(x) is x or torch.equal(layer.eval()(x), x)


def test_the_same_seed_gives_the_same_mask():
    torch.manual_seed(3)
    a, _ = tricks.keep_mask((64, 64), 0.5, "cpu")
    torch.manual_seed(3)
    b, _ = tricks.keep_mask((64, 64), 0.5, "cpu")
    c, _ = tricks.keep_mask((64, 64), 0.5, "cpu")
    assert torch.equal(a, b) and not torch.equal(b, c)


def dropped_attention(fused, dtype=torch.float32):
    torch.manual_seed(1)
    scores = torch.randn(2, 3, 5, 5, requires_grad=True)
    v = torch.randn(2, 3, 5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        probs = scores.softmax(-1)
        torch.manual_seed(0)
        if fused:
            y = tricks.DropoutThenMatmul.apply(probs, v, 0.3)
        else:
            keep, scale = tricks.keep_mask(probs.shape, 0.3, "cpu")
            y = (probs * keep * scale) @ v
    y.float().square().sum().backward()
    return y, scores.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_then_matmul_equals_plain_autograd(dtype):
    """It keeps the probabilities and the mask instead of the dropped copy: same values, same
    gradients (in bf16, up to the rounding of a different order of operations: 8 bits of mantissa)."""
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for ours, textbook in zip(dropped_attention(True, dtype), dropped_attention(False, dtype)):
        assert ours.dtype == textbook.dtype
        torch.testing.assert_close(ours, textbook, rtol=tolerance, atol=tolerance)


# ---- chunked_loss -----------------------------------------------------------------------------

@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_output_layer_loss_equals_the_plain_one_with_gradients(tiny_gpt2, bf16):
    """Chunks of 5 positions over batches of 2 x 13: the loss and every gradient of the plain loss
    over the full logits (the output layer is tied to the embeddings, so both reach that weight).
    Under bf16 autocast both run the products in bf16: they agree to bf16's 8 bits of mantissa."""
    tok = load_tokenizer(tiny_gpt2)
    batch = lm_batch([ids + [tok.eos_id] for ids in tok.encode_batch(["A penguin walked into a bar.", "Why?"])], tok.pad_id)
    grads = []
    for chunked in (False, True):
        model = GPT2.from_pretrained(tiny_gpt2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if chunked:
                total, count = tricks.output_layer_lm_loss_sum(model(batch["input_ids"], batch["attention_mask"], output_layer=False),
                                                               model.lm_head.weight, batch["labels"], chunk=5)
            else:
                total, count = causal_lm_loss_sum(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        (total / count).backward()
        grads.append((total.item(), {n: p.grad for n, p in model.named_parameters()}))
    (textbook, g_plain), (chunked, g_chunked) = grads
    assert all(g.dtype == torch.float32 for g in g_chunked.values())
    if not bf16:
        assert abs(textbook - chunked) < 1e-5 * abs(textbook)
        assert all((g_plain[n] - g_chunked[n]).abs().max() < 1e-5 for n in g_plain)
    else:
        assert abs(textbook - chunked) < 1e-2 * abs(textbook)
        for n in g_plain:
            assert (g_plain[n] - g_chunked[n]).abs().max() <= 1e-2 * g_plain[n].abs().max(), n


# ---- packed_weights and fast_sampling ------------------------------------------------------------

def test_packed_linears_compute_what_the_plain_ones_do_and_are_put_back(tiny_gpt2):
    model = GPT2.from_pretrained(tiny_gpt2, dtype=torch.bfloat16)
    layers = [model.transformer.h[0].mlp.c_fc, model.lm_head]
    with torch.no_grad():
        layers[0].bias.normal_()                  # a fresh model's biases are zero: make this one count
    if not tricks.packs(layers[0]):
        pytest.skip("this CPU's PyTorch cannot pack bf16 weights")
    inputs = [[torch.randn(rows, 1, layer.in_features, dtype=torch.bfloat16) for rows in (1, 3)] +
              [torch.randn(3, 7, layer.in_features, dtype=torch.bfloat16)] for layer in layers]   # decoding steps, a prompt
    textbook = [[layer(x) for x in xs] for layer, xs in zip(layers, inputs)]
    with torch.inference_mode(), tricks.packed_linears(model):
        assert type(model.transformer.h[0].mlp.c_fc) is tricks.PackedLinear and type(model.lm_head) is tricks.PackedLinear
        packed = [[model.transformer.h[0].mlp.c_fc(x) for x in inputs[0]], [model.lm_head(x) for x in inputs[1]]]
    for expected, got in zip(textbook, packed):
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)          # bf16 keeps 8 bits of mantissa
    assert model.transformer.h[0].mlp.c_fc is layers[0] and model.lm_head is layers[1]


def test_fp32_layers_are_packed_for_several_rows_and_compute_what_the_plain_ones_do(tiny_gpt2):
    model = GPT2.from_pretrained(tiny_gpt2)
    layers = [model.transformer.h[0].mlp.c_fc, model.transformer.h[0].attn.c_attn, model.lm_head]
    assert not tricks.packs(layers[0], rows=1)                 # one row: the weights as they are (no second copy)
    if not tricks.packs(layers[0], rows=8):
        pytest.skip("this PyTorch has no oneDNN")
    with torch.no_grad():
        layers[0].bias.normal_()
    inputs = [[torch.randn(rows, 1, layer.in_features) for rows in (8, 3)] + [torch.randn(8, 7, layer.in_features)]
              for layer in layers]                             # decoding steps, fewer rows left, a prompt
    textbook = [[layer(x) for x in xs] for layer, xs in zip(layers, inputs)]
    with torch.inference_mode(), tricks.packed_linears(model, rows=8):
        twins = [model.transformer.h[0].mlp.c_fc, model.transformer.h[0].attn.c_attn, model.lm_head]
        assert all(type(t) is tricks.PackedLinear for t in twins)
        packed = [[twin(x) for x in xs] for twin, xs in zip(twins, inputs)]
    for expected, got in zip(textbook, packed):
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)          # fp32, summed in another order
    assert [model.transformer.h[0].mlp.c_fc, model.transformer.h[0].attn.c_attn, model.lm_head] == layers


def test_transposed_output_layer_computes_what_the_plain_one_does_and_follows_its_weight(tiny_gpt2):
    model = GPT2.from_pretrained(tiny_gpt2)
    head = model.lm_head
    x = torch.randn(3, 1, head.in_features)
    with torch.inference_mode(), tricks.packed_linears(model):
        assert type(model.lm_head) is tricks.TransposedLinear
        torch.testing.assert_close(model.lm_head(x), head(x), rtol=1e-5, atol=1e-5)
        kept = model.lm_head.transposed
    with torch.inference_mode(), tricks.packed_linears(model):
        assert model.lm_head.transposed is kept                     # made once, reused
    assert model.lm_head is head
    with torch.no_grad():
        head.weight.mul_(2)                                          # a changed weight gets a new copy
    with torch.inference_mode(), tricks.packed_linears(model):
        torch.testing.assert_close(model.lm_head(x), head(x), rtol=1e-5, atol=1e-5)


# ---- quantized_decoding ----------------------------------------------------------------------------

def test_int8_kernel_multiplies_by_the_weight_llm_int8_stores(tiny_gpt2):
    from nanotune.quantize import dequantized_weight
    model = GPT2.from_pretrained(tiny_gpt2, quantize=QuantConfig("8bit"))
    layer = model.transformer.h[0].mlp.c_fc
    assert tricks.int8_decodes(layer)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 5, layer.in_features)
    expected = x @ dequantized_weight(layer).T + layer.bias
    got = tricks.Int8Linear(layer)(x)
    assert got.dtype == x.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())  # bf16 activations


def test_bf16_copy_of_a_4bit_layer_multiplies_by_the_weight_it_stores(tiny_gpt2):
    from nanotune.quantize import dequantized_weight
    model = GPT2.from_pretrained(tiny_gpt2, quantize=QuantConfig("4bit"))
    layer = model.transformer.h[0].mlp.c_fc
    assert tricks.dequantizes_4bit_once(layer)               # loaded without bitsandbytes' CPU inference kernel
    with torch.no_grad():
        layer.bias.normal_()
    for x in (torch.randn(1, 1, layer.in_features), torch.randn(3, 5, layer.in_features)):   # a decoding step, a prompt
        expected = x @ dequantized_weight(layer).T + layer.bias
        got = tricks.Bf16Linear(layer)(x)
        assert got.dtype == x.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())  # bf16 weights


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_decoding_picks_the_tokens_the_plain_layers_pick(tiny_gpt2, mode):
    """Greedy tokens from the fast kernels and the bf16 output layer equal the same quantized
    model's through bitsandbytes' layers and the fp32 output layer; the layers are put back."""
    model = GPT2.from_pretrained(tiny_gpt2, quantize=QuantConfig(mode))
    before = [(n, type(m)) for n, m in model.named_modules()]
    prompts = [[5, 17, 99, 3], [42, 8]]
    for batch in (prompts, prompts[:1]):                   # several sequences, and one (Bf16Linear for 4-bit layers)
        with tricks.plain(["quantized_decoding"]):
            slow = generate(model, batch, 24, 0, temperature=0)
        assert generate(model, batch, 24, 0, temperature=0) == slow
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert tricks.reads_output_layer_in_bf16(model)                                    # one row: always
    assert not tricks.reads_output_layer_in_bf16(GPT2.from_pretrained(tiny_gpt2))     # full precision stays fp32


@pytest.mark.parametrize("use_trick", [True, False])
def test_sampling_draws_each_token_with_its_probability(use_trick):
    """Inverse transform sampling and torch.multinomial: each token with its own probability,
    never one whose probability is 0, and nothing left of the filtered-out tokens."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    logits = probs.log().repeat(40_000, 1)
    with tricks.plain([] if use_trick else ["fast_sampling"]):
        tokens = next_tokens(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    share = torch.bincount(tokens, minlength=5) / len(tokens)
    assert share[1] == 0 and share[4] == 0
    torch.testing.assert_close(share, probs, atol=0.01, rtol=0)


# ---- quantize_in_pieces -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3072, 768), (50, 100), (7, 96)])
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_by_rows_is_bitsandbytes_byte_for_byte(shape, quant_type, double_quant):
    """Quantizing a few rows at a time gives the bytes and scales bitsandbytes gives for the whole
    matrix in its one call, also when rows do not end on a block boundary."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    theirs, their_state = quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    ours, our_state = tricks.quantize_4bit_by_rows(weight, QuantConfig("4bit", quant_type, double_quant), chunk_weights=1000)
    assert torch.equal(ours, theirs) and torch.equal(our_state.absmax, their_state.absmax)
    assert torch.equal(dequantize_4bit(ours, our_state), dequantize_4bit(theirs, their_state))


def test_a_4bit_model_loads_the_same_either_way(bpe_dir, tmp_path):
    from conftest import make_gpt2
    folder = make_gpt2(tmp_path / "m", bpe_dir, n_embd=64, n_head=4)
    ids = torch.tensor([list(range(1, 20))])
    with torch.no_grad():
        fast = GPT2.from_pretrained(folder, quantize=QuantConfig("4bit"))(ids)
        with plain(["quantize_in_pieces"]):
            textbook = GPT2.from_pretrained(folder, quantize=QuantConfig("4bit"))(ids)
    assert torch.equal(fast, textbook)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_the_quantization_step_of_train_py_equals_its_twin(bpe_dir, tmp_path, mode):
    """train.load_pretrained: the whole model loaded, then quantize_linears (--plain), or each layer
    swapped as it loads (the trick): the same quantized weights, the same logits."""
    from types import SimpleNamespace

    from conftest import make_gpt2
    folder = make_gpt2(tmp_path / "m", bpe_dir, n_embd=64, n_head=4)
    args = SimpleNamespace(model=str(folder), new_head=False)
    run = SimpleNamespace(device=torch.device("cpu"), quant=QuantConfig(mode))
    ids = torch.tensor([list(range(1, 20))])
    fast = train.load_pretrained(args, run, None)
    with plain(["quantize_in_pieces"]):
        textbook = train.load_pretrained(args, run, None)
    assert {type(m).__name__ for m in textbook.modules()} == {type(m).__name__ for m in fast.modules()}
    assert any(type(m).__name__.startswith("Linear") and "bit" in type(m).__name__ for m in textbook.modules())
    with torch.no_grad():
        assert torch.equal(fast(ids), textbook(ids))


# ---- mapped_checkpoint, transposed_views -----------------------------------------------------------

def test_a_mapped_checkpoint_reads_what_load_file_reads(tiny_gpt2, tiny_llama):
    from safetensors.torch import load_file

    from nanotune import hub
    for folder in (tiny_gpt2, tiny_llama):
        reference = load_file(folder / "model.safetensors")
        with plain(["mapped_checkpoint"]):
            textbook = dict(hub.iter_checkpoint(folder))
        fast = dict(hub.iter_checkpoint(folder))
        assert fast.keys() == textbook.keys() == reference.keys()
        assert all(torch.equal(fast[k], reference[k]) and torch.equal(textbook[k], reference[k]) for k in reference)


def test_gpt2_loads_the_same_weights_as_views_or_as_copies(tiny_gpt2):
    """The plain load copies each Conv1D weight into (out, in) order; the twin keeps transposed
    views, and own_memory (when the optimizer is made) gives the trained ones memory of their own:
    the same weights either way, and the same first training step."""
    from nanotune.optim import make_optimizer
    with plain(["transposed_views", "mapped_checkpoint"]):
        textbook = GPT2.from_pretrained(tiny_gpt2)
    fast = GPT2.from_pretrained(tiny_gpt2)
    assert all(t.is_contiguous() for t in textbook.state_dict().values())
    assert any(not t.is_contiguous() for t in fast.state_dict().values())
    tok = load_tokenizer(tiny_gpt2)
    batch = lm_batch([tok.encode(t) for t in TEXTS], tok.pad_id)
    for model in (textbook, fast):
        without_dropout(model.train())
        optimizer = make_optimizer(model, 1e-3, 0.01)          # own_memory: the fast views become copies
        train.loss_sum(model, batch, "lm").backward()
        optimizer.step()
    assert all(t.is_contiguous() for t in fast.state_dict().values())
    a, b = textbook.state_dict(), fast.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- keep_freed_memory -----------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_training_steps_reuse_freed_memory_without_page_faults():
    # Each step frees its activations and gradients and allocates them again; with the setting the
    # next step must find that memory still mapped, not ask the kernel for fresh zeroed pages.
    script = """
import resource, sys, torch
from nanotune.tricks import keep_freed_memory
if sys.argv[1] == "1":
    keep_freed_memory()
layer, x = torch.nn.Linear(768, 50257), torch.randn(64, 768)     # GPT-2's output layer: a 154 MB gradient
faults = []
for step in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.cross_entropy(layer(x), torch.zeros(64, dtype=torch.long)).backward()
    layer.weight.grad = layer.bias.grad = None
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[4:]))                  # the steady state, once the heap has grown to a step's size
"""
    without, with_setting = (int(subprocess.run([sys.executable, "-c", script, flag], capture_output=True, text=True,
                                                check=True, cwd=ROOT).stdout) for flag in ("0", "1"))
    assert with_setting * 5 < without, (with_setting, without)


# ---- background_saving -----------------------------------------------------------------------

@pytest.mark.parametrize("lora", [False, True], ids=["whole-model", "lora"])
def test_a_background_save_writes_what_the_plain_save_writes(tmp_path, tiny_gpt2, lora):
    """The files hold the epoch's end although training goes on at once: the same model (or
    adapter) and training state as the plain save made at the same moment, byte for byte."""
    from argparse import Namespace

    from nanotune.lora import LoRAConfig, add_lora
    from nanotune.optim import make_optimizer
    from nanotune.run.checkpoint import Saver, save_state
    model, tokenizer = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    config = LoRAConfig(("c_attn", "c_proj", "c_fc"), r=2) if lora else None
    if lora:
        add_lora(model, config)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    batch = lm_batch([tokenizer.encode(t) for t in TEXTS], tokenizer.pad_id)

    def step():
        train.loss_sum(model, batch, "lm").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()
    args, progress = Namespace(model=str(tiny_gpt2), fsdp=False), {"epoch": 1, "step_in_epoch": 0, "step": 1}
    save = lambda folder, weights=None: train.save_model(model, tokenizer, folder, config, args, True, weights)
    rng = torch.get_rng_state()
    save(tmp_path / "plain")
    save_state(tmp_path / "plain" / "checkpoint", model, optimizer, progress)
    torch.set_rng_state(rng)
    import threading
    trained = threading.Event()       # the files are written after the next epoch's steps changed everything
    saver = Saver(tmp_path / "background", model, optimizer, lambda w: (trained.wait(), save(tmp_path / "background", w)),
                  background=True, whole_model=not lora)
    saver.save(True, progress)
    for _ in range(3):
        step()
    trained.set()
    saver.wait()
    written = lambda folder: {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    plain_files, background_files = written(tmp_path / "plain"), written(tmp_path / "background")
    assert plain_files.keys() == background_files.keys()
    assert all(plain_files[f] == background_files[f] for f in plain_files if f.suffix != ".pt")
    states = [torch.load(folder / "checkpoint/training_state.pt", weights_only=True) for folder in
              (tmp_path / "plain", tmp_path / "background")]
    flat = lambda state: torch.utils._pytree.tree_flatten(state)[0]
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(*map(flat, states), strict=True))
    assert not torch.equal(model.state_dict()[next(iter(states[1]["model"]))], next(iter(states[1]["model"].values())))


# ---- the switch ------------------------------------------------------------------------------

def test_plain_turns_tricks_off_inside_its_block_only():
    assert all(tricks.enabled(n) for n in tricks.NAMES)
    with plain():
        assert not any(tricks.enabled(n) for n in tricks.NAMES)
        with plain(["attention"]):
            assert not tricks.enabled("attention")
    assert all(tricks.enabled(n) for n in tricks.NAMES)
    with pytest.raises(ValueError, match="no trick named flash"):
        with plain(["flash"]):
            pass


def test_plain_commands_run_end_to_end(tmp_path, tiny_gpt2):
    """train.py --plain and generate.py --plain: the whole job on the textbook path, and the same
    model and greedy text as the default path (dropout draws differ, so both train without it)."""
    outs = {}
    for flag in ([], ["--plain"]):
        out = tmp_path / ("plain" if flag else "fast")
        r = run_cli("train.py", "--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--epochs", 1, "--lr", 1e-3,
                    "--out", out, *flag)
        assert r.returncode == 0, r.stderr
        outs[bool(flag)] = out
    import json
    assert json.loads((outs[True] / "args.json").read_text())["plain"] == list(tricks.NAMES)
    texts = [run_cli("generate.py", "--model", outs[True], "--prompt", "Why", "--prompt", "My grandmother",
                     "--temperature", 0, "--max-new-tokens", 12, *flag) for flag in ([], ["--plain"])]
    assert texts[0].returncode == texts[1].returncode == 0 and texts[0].stdout == texts[1].stdout
    sampled = run_cli("generate.py", "--model", outs[True], "--prompt", "Why", "--plain", "--seed", 1, "--max-new-tokens", 5)
    assert sampled.returncode == 0 and sampled.stdout.startswith("Why")
