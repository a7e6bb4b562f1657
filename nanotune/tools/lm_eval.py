"""generate.py --lm-eval TASKS: EleutherAI's lm-evaluation-harness scores nanotune's own model.

lm-eval turns every task (HellaSwag, ARC, MMLU, GSM8K, or a YAML of your own) into requests of
three kinds, in text, and asks the model to answer them:
- loglikelihood(context, continuation): log P(continuation | context), summed over the
  continuation's tokens, and whether greedy decoding would write exactly it. A multiple-choice
  task asks it once per choice and counts the question right when the answer scores highest.
- loglikelihood_rolling(text): log P(text), every token scored once (perplexity tasks).
- generate_until(context, settings): what the model writes, up to the first stop string.
NanotuneLM answers them with the model generate.py loaded (a Hub folder or id, a run with its
adapter, GGUF, 8/4-bit), and tokenizes the way lm-eval's own `--model hf` does, so that its
scores are the ones other people report. lm-eval is an optional extra (pip install lm-eval):
nothing is imported from it until a run asks for it.
"""
import json
import logging
import math
import sys
from pathlib import Path

import torch

from ..data import lm_windows
from ..errors import NanotuneError
from ..files import atomic_write
from ..generation import generate
from ..losses import IGNORE
from ..tokenizer import pad

RESULTS = "lm_eval_results.json"


class NanotuneLM:
    """An lm-eval model (registered as a virtual subclass of lm_eval.api.model.LM by `as_lm`:
    Python's ABC.register, so that importing this file does not import lm-eval)."""

    rank, world_size = 0, 1            # one process: lm-eval's distributed hooks have nothing to do

    def __init__(self, model, tokenizer, batch_size=8, template=None, stride=None):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.template = template                    # a ChatTemplate when lm-eval applies the chat template
        self.context = model.config.context
        self.stride = min(stride or self.context - 1, self.context - 1)       # --eval's windows
        self.device = model.lm_head.weight.device
        # With no context to condition on, a text is scored after the beginning-of-text token (as `hf` does).
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    # ---- tokenizing as lm-eval's `hf` model does ---------------------------------------------------
    def encode(self, text):
        """A text's ids; one that already starts with the beginning-of-text token (a chat template
        writes its own) gets no second one."""
        starts_with_bos = text.startswith(self.tokenizer.decode([self.prefix_id], skip_special_tokens=False))
        return self.tokenizer.encode(text, add_special_tokens=not starts_with_bos)

    def encode_pair(self, context, continuation):
        """(context ids, continuation ids). The space between them goes with the continuation (" Paris",
        one token, not " " then "Paris"), and the pair is encoded whole and then split, because a BPE
        merge may cross the boundary."""
        if not context:
            ids = self.tokenizer.encode(continuation, add_special_tokens=False)
            return ([self.prefix_id], ids) if ids[0] != self.prefix_id else (ids[:1], ids[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head):]

    # ---- the three requests --------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm=True):
        """(log P(continuation | context), greedy?) for each request. Position t predicts token t+1, so
        the continuation's n tokens are scored by the n positions before them; a pair longer than the
        context loses tokens on the left. Batched, longest first (each batch pads to its first)."""
        pairs = [self.encode_pair(*r.args) for r in requests]
        sequences = [(c + t)[-(self.context + 1):] for c, t in pairs]
        windows = [(s[:-1], [IGNORE] * (len(s) - 1 - len(t)) + t) for s, (_, t) in zip(sequences, pairs)]
        return [(float(lp.sum()), bool(greedy)) for lp, greedy in self.score(windows)]

    def loglikelihood_rolling(self, requests, disable_tqdm=True):
        """log P(text): the text after the beginning-of-text token, read in --eval's windows (a text
        longer than the context in windows `stride` apart, each token scored once)."""
        results = []
        for r in requests:
            ids = [self.prefix_id] + self.encode(r.args[0])
            windows = [(w[:-1], lab[1:]) for w, lab in lm_windows(ids, self.context, self.stride)]
            results.append(sum(float(lp.sum()) for lp, _ in self.score(windows)))
        return results

    @torch.inference_mode()
    def score(self, windows):
        """(log-probabilities of the labelled tokens, whether each is the model's top choice) for
        (input ids, labels) pairs: labels[t] is the token input position t predicts, or -100 (not scored)."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results = [None] * len(windows)
        for start in range(0, len(order), self.batch_size):
            part = order[start:start + self.batch_size]
            ids, mask = pad([windows[i][0] for i in part], self.tokenizer.pad_id)          # (B, T), right-padded
            labels, _ = pad([windows[i][1] for i in part], IGNORE)                         # (B, T)
            logprobs = self.model(ids.to(self.device), mask.to(self.device)).float().log_softmax(-1).cpu()
            scored = labels != IGNORE
            picked = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]          # (B, T)
            top = logprobs.argmax(-1) == labels
            for row, i in enumerate(part):
                results[i] = (picked[row][scored[row]], bool(top[row][scored[row]].all()))
        return results

    def generate_until(self, requests, disable_tqdm=True):
        """What the model writes after each context: greedy unless the task samples, nanotune's own
        batched generation (generation.py), ended at the end-of-text (or end-of-turn) token, after
        max_gen_toks tokens, or at a stop string, which is cut off. Requests with the same settings
        go together, longest first."""
        eos_text = self.tokenizer.decode([self.tokenizer.eos_id], skip_special_tokens=False)
        stop_ids = self.template.stop_ids() if self.template else self.tokenizer.eos_id
        groups = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        results = [None] * len(requests)
        for key, members in groups.items():
            settings = json.loads(key)
            until = settings.get("until") or []
            until = ([until] if isinstance(until, str) else list(until)) + [eos_text]
            max_new = int(next((settings[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                                if k in settings), 256))
            sample = settings.get("do_sample", False) or float(settings.get("temperature", 0.0)) > 0
            temperature = float(settings.get("temperature", 1.0)) if sample else 0.0
            if max_new >= self.context:
                raise NanotuneError(f"a task asks for {max_new} new tokens, and the model's context is"
                                    f" {self.context}: lower max_gen_toks in the task's generation_kwargs")
            prompts = {i: self.encode(requests[i].args[0])[-(self.context - max_new):] for i in members}
            members.sort(key=lambda i: -len(prompts[i]))
            for start in range(0, len(members), self.batch_size):
                part = members[start:start + self.batch_size]
                texts = {}

                def stop_at_string(row, new_ids):      # the text so far; True ends this row
                    text = self.tokenizer.decode(new_ids)
                    cut = min((text.find(s) for s in until if s in text), default=-1)
                    texts[row] = text if cut < 0 else text[:cut]
                    return cut >= 0

                generate(self.model, [prompts[i] for i in part], max_new, self.tokenizer.pad_id, stop_ids,
                         temperature, settings.get("top_k"), settings.get("top_p"), on_token=stop_at_string)
                for row, i in enumerate(part):
                    results[i] = texts.get(row, "")
        return results

    # ---- chat models: lm-eval writes the prompt through the model's own template --------------------
    @property
    def tokenizer_name(self):
        return str(self.tokenizer.folder or "nanotune").replace("/", "__")

    def chat_template(self, chat_template=False):
        return self.template.source if self.template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.template.render(chat_history, add_generation_prompt=add_generation_prompt)


def as_lm(model, tokenizer, batch_size=8, template=None, stride=None):
    """NanotuneLM, made an lm-eval LM (lm-eval checks isinstance)."""
    from lm_eval.api.model import LM
    LM.register(NanotuneLM)
    return NanotuneLM(model, tokenizer, batch_size, template, stride)


def check_installed():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise NanotuneError("--lm-eval runs EleutherAI's lm-evaluation-harness, which is not installed:"
                            " pip install lm-eval (or the project's [eval] extra)") from None


def find_tasks(spec):
    """(task names, lm-eval's TaskManager that knows them) from --lm-eval: comma-separated task names
    (lm-eval's own, looked up in its index) and paths to a task YAML or a folder of them (every task
    there)."""
    from lm_eval.tasks import TaskManager
    names, folders, by_name = [], [], False
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path = Path(item).expanduser()
        if path.is_dir():
            folders.append(str(path))
            names += [n for n in (task_name(y, required=False) for y in sorted(path.glob("*.yaml"))) if n]
        elif path.is_file() or item.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise NanotuneError(f"--lm-eval {item}: no such file")
            folders.append(str(path.parent))
            names.append(task_name(path))
        else:
            names.append(item)
            by_name = True
    if not names:
        raise NanotuneError(f"--lm-eval {spec!r} names no task: give task names, or a task YAML or folder")
    # lm-eval's own index (thousands of YAMLs) is read only when a task is named, not given by its path
    manager = TaskManager(include_path=folders or None, include_defaults=by_name, verbosity="ERROR")
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise NanotuneError(f"no lm-eval task {', '.join(unknown)}: see `lm_eval ls tasks`, or give the path of a"
                            " task YAML or folder")
    return names, manager


def task_name(yaml_path, required=True):
    """The `task:` of a task YAML, read without lm-eval's loader (its `!function` tags need it); None
    for another YAML in a folder of tasks (a group, a template others include)."""
    for line in Path(yaml_path).read_text(encoding="utf-8").splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("\"'")
    if not required:
        return None
    raise NanotuneError(f"{yaml_path} has no `task:` line: it is not an lm-eval task YAML")


def hub_unreachable(error):
    """Whether an error (or one it was raised from) says the Hub could not be reached."""
    while error is not None:
        text = f"{type(error).__name__} {error}"
        if any(s in text for s in ("offline", "Offline", "ConnectionError", "LocalEntryNotFound",
                                   "Couldn't reach", "couldn't be found on the Hugging Face Hub")):
            return True
        error = error.__cause__ or error.__context__
    return False


def results_path(args):
    """Beside the run: in the model's (or adapter's) folder, beside a GGUF file, or here for a Hub id."""
    where = Path(args.adapter or args.model or "out").expanduser()
    if where.is_dir():
        return where / RESULTS
    return where.with_suffix(".lm_eval.json") if where.is_file() else Path(RESULTS)


def run(args, model, tokenizer, template):
    """generate.py --lm-eval: run the tasks, write lm-eval's results JSON beside the run, print its
    table. A chat model's prompts go through its chat template (lm-eval's --apply_chat_template)
    unless --raw."""
    from lm_eval.utils import handle_non_serializable, make_table
    target = results_path(args)
    if target.exists() and not _ours(target):
        raise NanotuneError(f"{target} exists and was not written by nanotune: move it away first")
    results = evaluate_tasks(args.lm_eval, model, tokenizer, template, args.batch_size, args.stride, args.limit,
                             args.num_fewshot)
    results["config"]["model"] = str(args.adapter or args.model or "out")
    results["nanotune"] = True            # this file is nanotune's: the next run may replace it
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(text if args.json else make_table(results))
    print(f"results: {target}", file=sys.stderr)
    return 0


def after_training(args, run, chat):
    """train.py --lm-eval: the tasks on the best model the run saved in --out (reloaded, its LoRA
    adapter applied, as generate.py --model OUT loads it), the scores into OUT/metrics.jsonl as one
    "lm_eval" event, and lm-eval's table printed. The prompts are written as the model was trained:
    through its chat template after training on conversations (chat), as plain text otherwise."""
    from lm_eval.utils import make_table

    from ..chat import ChatTemplate
    from ..lora import load_adapter, merge_lora
    from ..models import load_model
    from ..run.metrics import MetricsLog
    from ..tokenizer import load_tokenizer
    if not run.main_process:
        return 0
    out = Path(args.out)
    if run.lora:
        model = load_adapter(load_model(args.model, device=run.device, quantize=run.quant), out)
        if not run.quant:
            merge_lora(model)          # generation then costs what the base model costs
    else:
        model = load_model(out, device=run.device)
    tokenizer = load_tokenizer(out)
    template = ChatTemplate(tokenizer.chat_template, tokenizer) if chat and tokenizer.chat_template else None
    run.print(f"lm-eval: {args.lm_eval} on the best model in {out}/")
    results = evaluate_tasks(args.lm_eval, model, tokenizer, template, args.batch_size, args.stride,
                             args.lm_eval_limit)
    scores = {f"{task}/{metric.removesuffix(',none')}": value for task, r in results["results"].items()
              for metric, value in r.items() if "stderr" not in metric and isinstance(value, (int, float))
              and not isinstance(value, bool) and math.isfinite(value)}
    MetricsLog(out).log("lm_eval", tasks=args.lm_eval, limit=args.lm_eval_limit, **scores)
    run.print(make_table(results))
    return 0


def evaluate_tasks(spec, model, tokenizer, template, batch_size, stride=None, limit=None, num_fewshot=None):
    """lm-eval's results (its dict) for the tasks of `spec` on a loaded language model."""
    check_installed()
    if not hasattr(model, "lm_head"):
        raise NanotuneError("--lm-eval scores a language model; this one is a classifier: use --eval FILE")
    from lm_eval import simple_evaluate
    logging.getLogger("lm_eval").setLevel(logging.ERROR)     # its notes to task authors are not for this run
    names, manager = find_tasks(spec)
    lm = as_lm(model, tokenizer, batch_size, template, stride)
    try:
        return simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                               apply_chat_template=template is not None, verbosity="ERROR")
    except Exception as e:     # lm-eval reads each task's data first: the Hub's, or a local file's
        if hub_unreachable(e):
            raise hub_error(names) from None
        raise


def check_tasks(spec):
    """train.py --lm-eval, before training: lm-eval is installed, the tasks exist and their data can
    be read (a task over the Hub's data, offline, would otherwise fail only after the last epoch)."""
    check_installed()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names, manager = find_tasks(spec)
    try:
        manager.load_task_or_group(names)
    except Exception as e:
        if hub_unreachable(e):
            raise hub_error(names) from None
        raise


def hub_error(names):
    return NanotuneError(f"{', '.join(names)}: a task's data are on the Hugging Face Hub, which cannot be reached"
                         " (offline?): run once online to cache them, or use a task over local files (data/lm_eval)")


def _ours(path):
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("nanotune") is True
    except (OSError, ValueError, AttributeError):
        return False
