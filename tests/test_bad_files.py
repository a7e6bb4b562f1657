"""Files as users really have them: a broken config or adapter, a tokenizer that does not fit, long
CSV fields, odd JSONL values, late NUL bytes, an adapter moved to another directory, labels that
differ from a checkpoint's head. Each gives one clear line, or simply works."""
import json
import shutil

import pytest
import torch
from conftest import make_bert, make_gpt2, run_cli

import train
from nanotune import GPT2, BertClassifier, NanotuneError
from nanotune.data import read_examples


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def one_error_line(result, pattern):
    import re
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr


# ---- config.json -----------------------------------------------------------------------------

@pytest.mark.parametrize("edit, pattern", [
    (lambda c: [c], "holds a JSON list, not an object"),
    (lambda c: c | {"n_layer": "2"}, "'n_layer' is \"2\", which is not a whole number"),
    (lambda c: c | {"n_embd": 32.5}, "'n_embd' is 32.5, which is not a whole number"),
    (lambda c: c | {"layer_norm_epsilon": "small"}, "'layer_norm_epsilon' is \"small\", which is not a number"),
    (lambda c: c | {"n_head": 0}, "'n_head' is 0; it must be at least 1"),
])
def test_a_broken_config_is_named(tmp_path, tiny_gpt2, edit, pattern):
    folder = copy(tiny_gpt2, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps(edit(json.loads((folder / "config.json").read_text()))))
    with pytest.raises(NanotuneError, match=pattern):
        GPT2.from_pretrained(folder)
    one_error_line(run_cli("generate.py", "--model", folder, "--prompt", "Hi"), pattern)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, bpe_dir):
    folder = make_gpt2(tmp_path / "m", bpe_dir, vocab_size=100)       # the tokenizer has 512 tokens
    pattern = "has 512 tokens but the model's embedding has 100 rows"
    one_error_line(run_cli("train.py", "--model", folder, "--data", "anecdotes_jokes.txt", "--out", tmp_path / "o"), pattern)
    one_error_line(run_cli("generate.py", "--model", folder, "--prompt", "Hi"), pattern)
    assert not (tmp_path / "o").exists()


# ---- adapters --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_gpt2):
    """A LoRA run started with a relative --model from its own directory."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(tiny_gpt2, home / "models" / "base")
    r = run_cli("train.py", "--model", "models/base", "--data", "anecdotes_jokes.txt", "--lora-r", 2, "--epochs", 1,
                "--out", "run", cwd=home)
    assert r.returncode == 0, r.stderr
    return home


def test_an_adapter_finds_its_base_from_any_directory(adapter_run, tmp_path):
    config = json.loads((adapter_run / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((adapter_run / "models" / "base").resolve())
    r = run_cli("generate.py", "--model", adapter_run / "run", "--prompt", "Why", "--max-new-tokens", 3, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("Why"), r.stderr


def test_an_adapter_whose_base_cannot_be_found_says_what_to_pass(adapter_run, tmp_path):
    moved = copy(adapter_run / "run", tmp_path / "run")
    config = json.loads((moved / "adapter_config.json").read_text()) | {"base_model_name_or_path": "models/base"}
    (moved / "adapter_config.json").write_text(json.dumps(config))
    one_error_line(run_cli("generate.py", "--model", moved, "--prompt", "Hi", cwd=tmp_path),
                   "trained on 'models/base', which is neither a folder here nor a model in the Hugging Face cache: pass its base model with --model BASE --adapter")
    r = run_cli("generate.py", "--model", adapter_run / "models" / "base", "--adapter", moved, "--prompt", "Hi", "--max-new-tokens", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json is not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "8", "lora_alpha": 16, "target_modules": ["c_attn"]})),
     "r missing or of the wrong type"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:300]),
     "adapter_model.safetensors is truncated or corrupt"),
])
def test_a_damaged_adapter_is_named(adapter_run, tmp_path, damage, pattern):
    moved = copy(adapter_run / "run", tmp_path / "run")
    damage(moved)
    one_error_line(run_cli("generate.py", "--model", adapter_run / "models" / "base", "--adapter", moved, "--prompt", "Hi"), pattern)


# ---- data files ------------------------------------------------------------------------------

def test_a_csv_field_over_128_kib_is_read(tmp_path):
    long_review = "word " * 60_000                                   # 300 KB in one field
    (tmp_path / "long.csv").write_text(f'text,label\n"{long_review}",positive\nshort,negative\n')
    examples = read_examples(tmp_path / "long.csv", with_labels=True)
    assert examples[0] == {"text": long_review, "label": "positive"} and len(examples) == 2


@pytest.mark.parametrize("line, pattern", [
    ('{"text": 42, "label": "a"}', r"line 3: 'text' is 42, not a string of text"),
    ('{"text": {"body": "hi"}, "label": "a"}', r"line 3: 'text' is \{\"body\": \"hi\"\}, not a string"),
    ('{"text": "hi", "label": [1]}', r"line 3: 'label' is \[1\]: a label is a name or a whole number"),
])
def test_a_jsonl_value_of_the_wrong_type_names_the_line(tmp_path, line, pattern):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n\n' + line + "\n")
    with pytest.raises(NanotuneError, match=pattern):
        read_examples(path, with_labels=True)


def test_a_nul_byte_anywhere_is_found(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"a perfectly normal line\n" * 1000 + b"then \0 a NUL\n")
    with pytest.raises(NanotuneError, match="looks binary \\(a NUL byte on line 1001\\)"):
        read_examples(path)


# ---- labels against a checkpoint's classifier head ------------------------------------------------

@pytest.fixture(scope="module")
def sentiment_classifier(tmp_path_factory, minilm_dir):
    """A tiny BERT classifier whose head is named negative / positive."""
    folder = make_bert(tmp_path_factory.mktemp("clf"), minilm_dir)
    BertClassifier.from_pretrained(folder, labels=["negative", "positive"]).save_pretrained(folder)
    return folder


def test_labels_unlike_the_head_ask_for_a_new_head(tmp_path, sentiment_classifier):
    data = tmp_path / "topics.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{t}\n" for i in range(10) for t in ("sport", "politics", "food")))
    args = ["--model", sentiment_classifier, "--data", data, "--epochs", 1, "--out", tmp_path / "out"]
    one_error_line(run_cli("train.py", *args),
                   r"the data's labels \(food, politics, sport\) are not those of the classifier head .* \(negative, positive\): add --new-head")
    r = run_cli("train.py", *args, "--new-head")
    assert r.returncode == 0, r.stderr
    assert "classifier is replaced by a new one (--new-head)" in r.stdout
    saved = BertClassifier.from_pretrained(tmp_path / "out")
    assert saved.config.labels == ["food", "politics", "sport"] and saved.classifier.weight.shape[0] == 3
    body, before = saved.bert.encoder["layer"][0].output.dense.weight, BertClassifier.from_pretrained(sentiment_classifier)
    assert body.shape == before.bert.encoder["layer"][0].output.dense.weight.shape      # the body was kept and fine-tuned


def test_the_same_labels_keep_the_head_in_its_order(tmp_path, sentiment_classifier):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{t}\n" for i in range(8) for t in ("positive", "negative")))
    model = train.load_model(sentiment_classifier, labels=["positive", "negative"])
    assert model.config.labels == ["negative", "positive"]
    head = BertClassifier.from_pretrained(sentiment_classifier).classifier.weight
    assert torch.equal(model.classifier.weight, head)


# ---- generate.py with nothing to load ----------------------------------------------------------

def test_generate_without_a_model_and_without_out(tmp_path):
    one_error_line(run_cli("generate.py", "--prompt", "Hi", cwd=tmp_path), "no trained model in out/ .*train one first with train.py, or pass --model")
