"""nanotune's CPU dropout: the right rate and scale, reproducible, and attention's written-out
training path gives what SDPA gives."""
import pytest
import torch
import torch.nn.functional as F

from nanotune import GPT2
from nanotune.dropout import DropoutThenMatmul, dropout, keep_mask
from nanotune.gpt2 import attention_mask_for, causal_attention_with_dropout


def test_rate_scale_and_gradient():
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.002                     # 1e6 draws: the standard error is 0.0003
    assert abs(y.mean().item() - 1.0) < 0.003          # kept values are scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())             # d y / d x is the mask times the scale
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x


def test_same_seed_same_mask_and_a_new_draw_differs():
    torch.manual_seed(3)
    a, _ = keep_mask((64, 64), 0.5, "cpu")
    torch.manual_seed(3)
    b, _ = keep_mask((64, 64), 0.5, "cpu")
    c, _ = keep_mask((64, 64), 0.5, "cpu")
    assert torch.equal(a, b) and not torch.equal(b, c)


def dropped_attention(fused, dtype=torch.float32):
    torch.manual_seed(1)
    scores = torch.randn(2, 3, 5, 5, requires_grad=True)
    v = torch.randn(2, 3, 5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        probs = scores.softmax(-1)
        torch.manual_seed(0)
        if fused:
            y = DropoutThenMatmul.apply(probs, v, 0.3)
        else:
            keep, scale = keep_mask(probs.shape, 0.3, "cpu")
            y = (probs * keep * scale) @ v
    y.float().square().sum().backward()
    return y, scores.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_then_matmul_equals_plain_autograd(dtype):
    """It keeps the probabilities and the mask instead of the dropped copy: same values, same
    gradients (in bf16, up to the rounding of a different order of operations: 8 bits of mantissa)."""
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for ours, plain in zip(dropped_attention(True, dtype), dropped_attention(False, dtype)):
        assert ours.dtype == plain.dtype
        torch.testing.assert_close(ours, plain, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_training_attention_equals_sdpa(tiny_gpt2, padded):
    """Training with attention dropout on CPU takes the written-out path. With p so small that it
    rounds to no dropout at all, its logits and gradients must equal SDPA's (the inference path)."""
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0                                  # left padding in the first row
    results = []
    for training in (True, False):
        model = GPT2.from_pretrained(tiny_gpt2)
        for block in model.transformer.h:
            block.attn.attn_pdrop = 1e-6                 # 1e-6 x 65,536 rounds to 0 dropped levels
        model.train(training)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        logits = model(ids, attention_mask=mask if padded else None)
        logits[mask.bool()].square().mean().backward()
        results.append((logits, model.transformer.h[0].attn.c_attn.weight.grad))
    (ours, ours_grad), (sdpa, sdpa_grad) = results
    real = mask.bool()
    torch.testing.assert_close(ours[real], sdpa[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, sdpa_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_in_blocks_of_queries_equals_sdpa(padded):
    """Blocks of queries that skip the keys after them give SDPA's result and gradients (dropout
    rounded to nothing), with a last block shorter than the others, with and without padding."""
    q, k, v = (torch.randn(2, 3, 11, 4, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3))
    padding = torch.ones(2, 11, dtype=torch.long)
    if padded:
        padding[0, :4] = 0
    mask = attention_mask_for(padding if padded else None, 11, 0, "cpu")          # (B or 1, 1, T, T)
    grad_y = torch.randn(2, 3, 11, 4)
    results = []
    for attend in (lambda: causal_attention_with_dropout(q, k, v, mask, 1e-6, block=4),
                   lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)):
        y = attend()
        q.grad = k.grad = v.grad = None
        y.backward(grad_y)
        results.append([y, q.grad, k.grad, v.grad])
    for ours, sdpa in zip(*results):
        torch.testing.assert_close(ours, sdpa, rtol=0, atol=1e-5)
