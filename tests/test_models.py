"""GPT-2 and BERT give the same numbers as `transformers` on the same weights, in every key
format real Hub checkpoints use."""
import json

import pytest
import torch
from conftest import make_gpt2, rewrite_checkpoint, seed_hub_cache

from nanotune import GPT2, Bert, BertClassifier, NanotuneError

TOL = 1e-4


def batch(vocab, B=3, T=12, seed=1):
    """Random ids with right padding of different lengths in every row but the first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 2 * b:] = 0
    return ids, mask


def assert_gpt2_parity(folder, reference_folder=None):
    from transformers import GPT2LMHeadModel
    ours = GPT2.from_pretrained(folder)
    ref = GPT2LMHeadModel.from_pretrained(reference_folder or folder).eval()
    ids, mask = batch(ours.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= TOL
        diff = (ours(ids, mask) - ref(ids, attention_mask=mask).logits).abs()
        assert diff[mask.bool()].max() <= TOL     # padded positions are not compared: nobody reads them


@pytest.mark.parametrize("overrides", [{}, {"n_layer": 3, "n_head": 2, "n_embd": 48, "n_inner": 80},
                                       {"activation_function": "relu", "layer_norm_epsilon": 1e-6}])
def test_gpt2_matches_transformers(tmp_path, bpe_dir, overrides):
    assert_gpt2_parity(make_gpt2(tmp_path / "m", bpe_dir, seed=3, **overrides))


def test_gpt2_hub_layout_without_prefix_with_mask_buffers(tmp_path, tiny_gpt2):
    """The `gpt2` repo: no `transformer.` prefix, no lm_head (tied), causal-mask buffers to ignore."""
    n_layer = json.loads((tiny_gpt2 / "config.json").read_text())["n_layer"]
    buffers = {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(n_layer)}
    buffers |= {f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(n_layer)}
    folder = rewrite_checkpoint(tiny_gpt2, tmp_path / "m", lambda k: None if k == "lm_head.weight" else k.removeprefix("transformer."), buffers)
    assert_gpt2_parity(folder, reference_folder=tiny_gpt2)


def test_gpt2_sharded(tmp_path, tiny_gpt2):
    folder = rewrite_checkpoint(tiny_gpt2, tmp_path / "m", shards=3)
    assert not (folder / "model.safetensors").exists()
    assert_gpt2_parity(folder)


def test_gpt2_save_pretrained_round_trip(tmp_path, tiny_gpt2):
    from transformers import AutoModelForCausalLM
    ours = GPT2.from_pretrained(tiny_gpt2)
    ours.save_pretrained(tmp_path / "saved")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    back = GPT2.from_pretrained(tmp_path / "saved")
    ids, _ = batch(ours.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= TOL
        assert torch.equal(ours(ids), back(ids))


def test_gpt2_tied_head_and_dtype(tiny_gpt2):
    model = GPT2.from_pretrained(tiny_gpt2, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert not any(p.is_meta for p in model.parameters())


def test_gpt2_weights_stay_in_the_file_until_an_optimizer_steps_them(tiny_gpt2):
    """Loading copies nothing: Conv1D weights are transposed views of the mapped checkpoint. The
    optimizer gives the weights it steps memory of their own (contiguous, same values, same
    Parameter), hands the file's pages back, and leaves every other weight as it was."""
    from nanotune.optim import make_optimizer
    model = GPT2.from_pretrained(tiny_gpt2)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert not c_fc.is_contiguous()
    model.transformer.h[1].requires_grad_(False)                  # frozen: stays a view of the file
    make_optimizer(model, 1e-3, 0.0)
    assert model.transformer.h[0].mlp.c_fc.weight is c_fc and c_fc.is_contiguous()
    assert not model.transformer.h[1].mlp.c_fc.weight.is_contiguous()
    for name, p in model.named_parameters():
        assert torch.equal(p, reference[name]), name
    ids, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        assert (model(ids) - GPT2.from_pretrained(tiny_gpt2)(ids)).abs().max() == 0


def test_own_memory_leaves_memory_outside_checkpoints_alone():
    from nanotune.hub import own_memory
    base = torch.randn(64, 1024)                                  # 256 KiB: whole pages under it
    weight = torch.nn.Parameter(base.t())
    own_memory([weight])
    assert weight.is_contiguous() and torch.equal(weight, base.t())
    assert base.abs().sum() > 0                                   # not handed back (it would read as zeros)


def assert_bert_parity(folder, reference_folder=None):
    from transformers import BertForSequenceClassification, BertModel
    ref_folder = reference_folder or folder
    ids, mask = batch(30522)
    enc, ref_enc = Bert.from_pretrained(folder), BertModel.from_pretrained(ref_folder).eval()
    clf, ref_clf = BertClassifier.from_pretrained(folder), BertForSequenceClassification.from_pretrained(ref_folder).eval()
    with torch.no_grad():
        diff = (enc(ids, mask) - ref_enc(input_ids=ids, attention_mask=mask).last_hidden_state).abs()
        assert diff[mask.bool()].max() <= TOL
        assert (clf(ids, mask) - ref_clf(input_ids=ids, attention_mask=mask).logits).abs().max() <= TOL


def test_bert_with_prefix_matches_transformers(tiny_bert):
    assert_bert_parity(tiny_bert)


def test_bert_legacy_gamma_beta_and_pretraining_heads(tmp_path, tiny_bert):
    """bert-base-uncased: `bert.` prefix, LayerNorm gamma/beta, `cls.*` heads to ignore."""
    legacy = lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    heads = {"cls.predictions.bias": torch.zeros(30522), "cls.seq_relationship.weight": torch.zeros(2, 32)}
    folder = rewrite_checkpoint(tiny_bert, tmp_path / "m", legacy, heads)
    assert_bert_parity(folder, reference_folder=tiny_bert)


def test_bert_sharded_matches_transformers(tmp_path, tiny_bert):
    assert_bert_parity(rewrite_checkpoint(tiny_bert, tmp_path / "m", shards=2))


def test_bert_without_prefix_gets_a_new_head(tmp_path, tiny_bert, capsys):
    """A bare encoder (like all-MiniLM-L6-v2): no prefix; the classifier starts new and says so."""
    folder = rewrite_checkpoint(tiny_bert, tmp_path / "m", lambda k: None if k.startswith("classifier") else k.removeprefix("bert."))
    encoder = Bert.from_pretrained(folder)
    clf = BertClassifier.from_pretrained(folder, labels=["neg", "neu", "pos"])
    assert "classifier is not in the checkpoint" in capsys.readouterr().out
    assert clf.classifier.weight.shape == (3, 32) and clf.config.id2label == {"0": "neg", "1": "neu", "2": "pos"}
    ids, mask = batch(30522)
    with torch.no_grad():
        assert torch.allclose(encoder(ids, mask), BertClassifier.from_pretrained(tiny_bert).bert(ids, mask))


def test_real_minilm_matches_transformers(minilm_dir):
    from transformers import BertModel
    from nanotune import load_tokenizer
    tok = load_tokenizer(minilm_dir)
    ids, mask = tok(["Fine-tuning is fun.", "A longer sentence, with punctuation, accents (café) and more words in it."])
    ours, ref = Bert.from_pretrained(minilm_dir), BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask)
        assert (ours(ids, mask) - out.last_hidden_state).abs()[mask.bool()].max() <= TOL
        assert (ours.pool(ours(ids, mask)) - out.pooler_output).abs().max() <= TOL


def test_bert_classifier_round_trip(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification
    clf = BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"])
    clf.save_pretrained(tmp_path / "saved")
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert ref.config.id2label == {0: "negative", 1: "positive"}
    ids, mask = batch(30522)
    with torch.no_grad():
        assert (clf(ids, mask) - ref(input_ids=ids, attention_mask=mask).logits).abs().max() <= TOL
    assert BertClassifier.from_pretrained(tmp_path / "saved").config.labels == ["negative", "positive"]


def test_hub_id_from_local_cache(tmp_path, tiny_gpt2):
    seed_hub_cache("someone/tiny-gpt2", tiny_gpt2)
    model = GPT2.from_pretrained("someone/tiny-gpt2")
    assert model.config.n_layer == 2


# ---- bad input: one clear NanotuneError each --------------------------------------------------

def test_unknown_hub_id_offline():
    with pytest.raises(NanotuneError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        GPT2.from_pretrained("nobody/no-such-model")


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(NanotuneError, match="no folder"):
        GPT2.from_pretrained(str(tmp_path / "nothing"))
    with pytest.raises(NanotuneError, match="no config.json"):
        GPT2.from_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NanotuneError, match="'llama' model"):
        GPT2.from_pretrained(tmp_path)
    with pytest.raises(NanotuneError, match="reads bert"):
        Bert.from_pretrained(tmp_path)


def test_pickled_weights_are_refused(tmp_path, tiny_gpt2):
    folder = rewrite_checkpoint(tiny_gpt2, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(NanotuneError, match="only pickled weights.*safetensors only"):
        GPT2.from_pretrained(folder)


def test_truncated_safetensors(tmp_path, tiny_gpt2):
    folder = rewrite_checkpoint(tiny_gpt2, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NanotuneError, match="truncated or corrupt"):
        GPT2.from_pretrained(folder)


def test_mismatched_weights_name_the_keys(tmp_path, tiny_gpt2):
    folder = rewrite_checkpoint(tiny_gpt2, tmp_path / "m", lambda k: None if k.endswith("h.1.mlp.c_fc.bias") else k.replace("ln_f", "ln_final"))
    with pytest.raises(NanotuneError, match=r"missing .*h\.1\.mlp\.c_fc\.bias.*transformer\.ln_f.*unexpected transformer\.ln_final"):
        GPT2.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text()) | {"n_embd": 48}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanotuneError, match="wrong shape"):
        GPT2.from_pretrained(folder)
