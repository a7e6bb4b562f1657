"""The optimizers: 8-bit AdamW against AdamW (its step, its state's size, an exact resume) and
fused AdamW against the plain one it stands in for."""
import pytest
import torch

from conftest import ROOT, run_cli
from nanotune import tricks
from nanotune.gpt2 import GPT2
from nanotune.optim import STATE_BYTES, make_optimizer

pytest.importorskip("bitsandbytes")


def state_bytes(optimizer):
    """Bytes of every tensor the optimizer keeps (moments, codes, scales, maps)."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
    return sum(t.nbytes for t in tensors(optimizer.state_dict()["state"]))


def trained(kind, model, steps, lr=1e-3, seed=0):
    """`steps` AdamW steps on `model` with the same random gradients for every kind."""
    optimizer = make_optimizer(model, lr, 0.1, kind=kind)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * (1 + torch.rand(p.shape[-1:], generator=gen))
        optimizer.step()
    return optimizer


def gpt2(folder):
    torch.manual_seed(0)
    return GPT2.from_pretrained(folder)


def test_an_8bit_step_stays_within_quantization_of_adamw(tiny_gpt2):
    """Ten steps: every weight's total move within a few percent of AdamW's (the moments rounded to
    256 levels a block), the tensors too small to quantize (biases, gains) moved exactly alike."""
    moved = {}
    for kind in ("adamw", "adamw8bit"):
        model = gpt2(tiny_gpt2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trained(kind, model, 10)
        moved[kind] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    quantized = 0
    for name, plain in moved["adamw"].items():
        error = (moved["adamw8bit"][name] - plain).norm() / plain.norm()
        if plain.numel() >= 4096:                          # bitsandbytes' threshold for 8-bit state
            quantized += 1
            assert 1e-4 < error < 0.03, (name, error)      # rounded, but only by the codes' step
        else:
            assert error < 1e-5, (name, error)
    assert quantized >= 5


def test_8bit_state_takes_under_a_third_of_adamws_bytes(tiny_gpt2, tmp_path, bpe_dir):
    """On a GPT-2 whose matrices hold nearly all its weights (as in every real one): ≤ 0.3x, and the
    memory estimate's bytes per parameter match what the optimizer holds."""
    from conftest import make_gpt2
    folder = make_gpt2(tmp_path / "wider", bpe_dir, n_embd=128)
    sizes = {}
    for kind in ("adamw", "adamw8bit"):
        model = GPT2.from_pretrained(folder)
        sizes[kind] = state_bytes(trained(kind, model, 1))
        n = sum(p.numel() for p in model.parameters())
        assert abs(sizes[kind] / n - STATE_BYTES[kind]) < 0.05 * STATE_BYTES[kind], (kind, sizes[kind] / n)
    assert sizes["adamw8bit"] <= 0.3 * sizes["adamw"], sizes


def test_fused_adamw_equals_plain_adamw(tiny_gpt2):
    """The fused_adamw trick against torch.optim.AdamW one parameter at a time: the same weights and
    moments after five steps, up to rounding."""
    results = {}
    for fast in (True, False):
        model = gpt2(tiny_gpt2)
        with tricks.plain([] if fast else ["fused_adamw"]):
            optimizer = trained("adamw", model, 5)
        assert bool(optimizer.defaults.get("fused")) == fast
        results[fast] = (dict(model.named_parameters()), optimizer.state_dict()["state"])
    (fast_weights, fast_state), (plain_weights, plain_state) = results[True], results[False]
    for name in plain_weights:
        assert torch.allclose(fast_weights[name], plain_weights[name], rtol=1e-5, atol=1e-7), name
    for i in plain_state:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(fast_state[i][moment], plain_state[i][moment], rtol=1e-5, atol=1e-12), (i, moment)


def test_a_run_with_8bit_moments_resumes_exactly(tmp_path, tiny_gpt2, monkeypatch):
    """Two epochs in one go and one epoch, stopped, then resumed: the same weights, the 8-bit codes
    and their scales saved and read back (weights_only: no pickled code)."""
    monkeypatch.setenv("MKL_CBWR", "AUTO")                 # one path through MKL's products (test_train.py)
    lines = (ROOT / "data" / "anecdotes_jokes.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "jokes.txt").write_text("\n".join(lines[:64]) + "\n", encoding="utf-8")
    args = lambda out, *extra: ["--model", tiny_gpt2, "--data", tmp_path / "jokes.txt", "--epochs", 2, "--lr", 1e-3,
                                "--optim", "adamw8bit", "--out", out, *extra]
    full = run_cli("train.py", *args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    first = run_cli("train.py", *args(tmp_path / "split", "--stop-after-epochs", 1))
    assert first.returncode == 0, first.stderr
    second = run_cli("train.py", *args(tmp_path / "split", "--resume"))
    assert second.returncode == 0, second.stderr
    a, b = (torch.load(tmp_path / run / "checkpoint/training_state.pt", weights_only=True) for run in ("full", "split"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    codes = [s["__bnb_optimizer_quant_state__"]["state1"] for s in b["optimizer"]["state"].values()]
    assert any(c.dtype == torch.uint8 for c in codes)


def test_resuming_with_the_other_optimizer_is_refused(tmp_path, tiny_gpt2):
    """AdamW's fp32 moments and the 8-bit codes do not load into each other: one line saying which."""
    from nanotune.errors import NanotuneError
    from nanotune.run.checkpoint import load_state, save_state
    model = gpt2(tiny_gpt2)
    save_state(tmp_path, model, trained("adamw8bit", model, 1), {"step": 1})
    with pytest.raises(NanotuneError, match="saved with --optim adamw8bit: resume it with --optim adamw8bit"):
        load_state(tmp_path, model, make_optimizer(model, 1e-3, 0.1))
    assert load_state(tmp_path, model, make_optimizer(model, 1e-3, 0.1, kind="adamw8bit")) == {"step": 1}


@pytest.mark.parametrize("flags, message", [(["--reward", "length"], "GRPO \\(--reward\\) steps with AdamW"),
                                            (["--fsdp"], "does not step FSDP's sharded weights")])
def test_adamw8bit_where_it_cannot_serve_is_refused(flags, message):
    from nanotune.errors import NanotuneError
    from nanotune.run.train_flags import check_settings, parser
    args = parser().parse_args(["--data", "x.txt", "--optim", "adamw8bit", *flags])
    with pytest.raises(NanotuneError, match=message):
        check_settings(args, "lm")
