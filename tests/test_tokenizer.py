"""Tokenization equals the reference tokenizers, from tokenizer.json and from the classic files."""
import shutil

import pytest

from nanotune import NanotuneError, load_tokenizer

TEXTS = [
    "Hello, world!",
    "Crème brûlée, naïve façade, Ångström, jalapeño.",
    "Emoji: 🙂👍🏽🇫🇷 and a family 👨‍👩‍👧",
    "中文分词测试，日本語のテキスト、한국어 문장.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "  leading spaces,\ttabs\t\tand   runs of   whitespace\n\nnew lines  ",
    "don't won't it's 1,234.56 e-mail@example.com <|endoftext|>",
]


@pytest.fixture()
def bpe_classic_only(tmp_path, bpe_dir):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_dir / name, tmp_path / name)
    return tmp_path


@pytest.fixture()
def wordpiece_classic_only(tmp_path, minilm_dir):
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    return tmp_path


def test_byte_level_bpe_from_vocab_and_merges_matches_gpt2_tokenizer(bpe_classic_only):
    from transformers import GPT2Tokenizer
    ours, ref = load_tokenizer(bpe_classic_only), GPT2Tokenizer.from_pretrained(bpe_classic_only)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.eos_id == ours.pad_id == ref.eos_token_id   # GPT-2 has no pad token: EOS, masked by position


def test_tokenizer_json_matches_reference(bpe_dir, minilm_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    for folder, ref in [(bpe_dir, PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"))),
                        (minilm_dir, AutoTokenizer.from_pretrained(minilm_dir))]:
        ours = load_tokenizer(folder)
        for text in TEXTS:
            assert ours.encode(text) == ref(text)["input_ids"], (folder, text)


def test_wordpiece_from_vocab_txt_matches_bert_tokenizer(wordpiece_classic_only, minilm_dir):
    from transformers import BertTokenizer
    ours, ref = load_tokenizer(wordpiece_classic_only), BertTokenizer.from_pretrained(wordpiece_classic_only)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
    # and the same as the repo's own tokenizer.json
    assert [ours.encode(t) for t in TEXTS] == [load_tokenizer(minilm_dir).encode(t) for t in TEXTS]
    assert (ours.pad_id, ours.eos_id) == (ref.pad_token_id, ref.sep_token_id)


def test_batch_truncates_and_pads_dynamically(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    ids, mask = tok(["short", "a much longer sentence than the first one, with many words"], max_length=8)
    assert ids.shape == (2, 8)
    assert mask.tolist()[0] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[1, -1] == tok.eos_id                     # truncation keeps the final [SEP]
    ids, mask = tok(["short", "two words"])
    assert ids.shape[1] == 4                            # padded to the longest, not to a fixed size
    left, left_mask = tok(["short", "two words"], side="left")
    assert left_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and left[0, 0] == tok.pad_id


def test_save_round_trip(tmp_path, bpe_classic_only):
    tok = load_tokenizer(bpe_classic_only)
    tok.save(tmp_path / "out")
    assert load_tokenizer(tmp_path / "out").encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(NanotuneError, match="no tokenizer"):
        load_tokenizer(tmp_path)
