"""The decoding tricks bound to their plain forms: FusedBlock computes what llama.Block computes,
generation gives the same tokens with and without it, it leaves blocks it does not know alone, and
bf16 generation of a Llama works."""
import torch
import torch.nn as nn

import nanotune
from nanotune import tricks
from nanotune.generation import KVCache, generate
from nanotune.models import load_model


def prompts(vocab, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9, 7)[:rows]]


def test_a_fused_block_computes_what_the_plain_block_computes(tiny_llama):
    model = load_model(tiny_llama)
    cfg = model.config
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6)[None].expand(2, 6)
    from nanotune.llama import rope_angles
    cos, sin = rope_angles(model.inv_freq, positions)
    with torch.inference_mode():
        for layer, block in enumerate(model.model.layers):
            assert tricks.fuses(block)
            caches = [KVCache(*model.cache_layout(), 2, 6) for _ in range(2)]
            plain = block(x, cos, sin, None, caches[0], layer)
            fused = tricks.FusedBlock(block)(x, cos, sin, None, caches[1], layer)
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(caches[1].k, caches[0].k)           # the same keys and values cached
            torch.testing.assert_close(caches[1].v, caches[0].v)


def test_generation_with_fused_blocks_gives_the_plain_tokens_and_puts_the_blocks_back(tiny_llama):
    model = load_model(tiny_llama)
    blocks = list(model.model.layers)
    ids = prompts(model.config.vocab_size)
    fused = generate(model, ids, 12, 0, None, temperature=0)
    assert list(model.model.layers) == blocks                                # the model's own blocks again
    with nanotune.plain(["fused_decoding"]):
        plain = generate(model, ids, 12, 0, None, temperature=0)
    assert fused == plain and all(len(t) == 12 for t in fused)


def test_blocks_with_parts_the_fused_block_does_not_know_keep_their_forward(tiny_llama):
    model = load_model(tiny_llama)
    block = model.model.layers[0]
    block.self_attn.q_norm = nn.Identity()                # as Qwen3's q/k norms before RoPE
    assert not tricks.fuses(block)
    del block.self_attn.q_norm
    block.extra_norm = nn.Identity()                      # as Gemma's norms after each sub-block
    assert not tricks.fuses(block)
    del block.extra_norm
    block.mlp.up_proj = nn.Linear(block.mlp.up_proj.in_features, block.mlp.up_proj.out_features, bias=True)
    assert not tricks.fuses(block)                        # gate without a bias, up with one: not stacked
    with tricks.fused_blocks(model):
        assert model.model.layers[0] is block and type(model.model.layers[1]) is tricks.FusedBlock
    model.train()
    with tricks.fused_blocks(model):
        assert all(type(b) is not tricks.FusedBlock for b in model.model.layers)   # training: never


def test_bf16_generation_of_a_llama_follows_fp32(tiny_llama):
    fp32, bf16 = load_model(tiny_llama), load_model(tiny_llama, dtype=torch.bfloat16)
    ids = prompts(fp32.config.vocab_size, rows=1)
    for model in (fp32, bf16):
        out = generate(model, ids, 8, 0, None, temperature=0)
        assert len(out[0]) == 8
    with torch.inference_mode():
        ref = fp32(torch.tensor(ids))[:, -1]
        half = bf16(torch.tensor(ids))[:, -1].float()
    assert (half - ref).abs().max() < 0.05 * ref.abs().max()
