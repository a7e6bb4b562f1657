"""Export a model to ONNX, and check the file against nanotune before saying it is done.

The graph takes `input_ids` and `attention_mask` (batch and sequence length free) and returns the
logits: (batch, sequence, vocabulary) for GPT-2, (batch, labels) for a classifier. For GPT-2 the
positions are counted from each row's first real token, as generation does, so a left-padded
batch gives the logits each prompt gives alone. Needs the export extra: onnx, onnxscript and
onnxruntime (pip install -e ".[export]").
"""
import importlib.util
import os
from pathlib import Path

import torch

from ..errors import NanotuneError
from ..files import atomic_write

EXTRA = ("onnx", "onnxscript", "onnxruntime")


class Logits(torch.nn.Module):
    """The model as the ONNX graph computes it: ids and mask in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        if hasattr(self.model, "lm_head"):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)    # left padding: count from the first real token
            return self.model(input_ids, attention_mask, positions)
        return self.model(input_ids, attention_mask)


def check_can_export(path, flag="--export-onnx"):
    """Before any work: the packages are there and the file can be written (and is not there yet)."""
    needed, extra = (EXTRA, "export") if flag == "--export-onnx" else (("gguf",), "gguf")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise NanotuneError(f"{flag} needs {', '.join(missing)}: pip install {' '.join(missing)} (or the"
                            f" project's [{extra}] extra)")
    path = Path(path)
    if path.exists():
        raise NanotuneError(f"{flag} {path} already exists: choose another file name, or remove it first")
    if not path.parent.is_dir():
        raise NanotuneError(f"{flag} {path}: there is no folder {path.parent}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise NanotuneError(f"{flag} {path}: no permission to write in {path.parent}: choose another folder")


def export_onnx(model, path, vocab_size):
    """Write the graph to `path` (one file, written atomically) and return the check's results."""
    model = model.eval().float()
    wrapper = Logits(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        free = {0: batch, 1: sequence}
        program = torch.onnx.export(wrapper, (ids, mask), input_names=["input_ids", "attention_mask"],
                                    output_names=["logits"], dynamic_shapes=(free, free), dynamo=True, verbose=False)
    atomic_write(Path(path), lambda tmp: program.save(tmp, external_data=False))
    return verify(model, path, vocab_size)


def verify(model, path, vocab_size, steps=32):
    """Run the file with onnxruntime: logits on random inputs (other shapes than the export's,
    with padding) against nanotune's, and for GPT-2 32 greedy tokens against nanotune's generate."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = lambda ids, mask: torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy(),
                                                                      "attention_mask": mask.numpy()})[0])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                       # a left-padded row
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ours = Logits(model)(ids, mask)
    theirs = run(ids, mask)
    real = mask.bool() if ours.dim() == 3 else torch.ones(ours.shape[0], dtype=torch.bool)
    result = {"max_logit_difference": float((ours - theirs).abs()[real].max())}
    if hasattr(model, "lm_head"):
        from ..generation import generate
        prompt = ids[0, :6].tolist()
        expected = generate(model, [prompt], steps, 0, None, temperature=0)[0]
        tokens = list(prompt)
        for _ in range(steps):
            seq = torch.tensor([tokens])
            tokens.append(int(run(seq, torch.ones_like(seq))[0, -1].argmax()))
        result |= {"greedy_tokens": steps, "greedy_identical": tokens[len(prompt):] == expected}
    return result


def run(model, path):
    """generate.py --export-onnx: write, check, and say how close onnxruntime came."""
    checked = export_onnx(model, path, model.config.vocab_size)
    greedy = checked.get("greedy_identical", True)
    print(f"wrote {path}; onnxruntime's logits differ from nanotune's by at most {checked['max_logit_difference']:.2e}"
          + (f", and its {checked['greedy_tokens']} greedy tokens are {'the same' if greedy else 'NOT the same'}"
             if "greedy_tokens" in checked else ""))
    return 0 if checked["max_logit_difference"] <= 1e-4 and greedy else 1


def run_gguf(model, tokenizer, path, kind):
    """generate.py --export-gguf: write the GGUF file, then read it back straight from its tensors
    (no cache: nothing is left behind, and a read-only cache does not matter) and compare the logits
    of a few sequences and 32 greedy tokens; with llama-cpp-python installed, llama.cpp itself loads
    the file too, and its tokens and greedy continuation are compared with nanotune's."""
    from .. import gguf_file
    from ..generation import generate
    from ..llama import Llama
    if not isinstance(model, Llama):
        raise NanotuneError(f"--export-gguf writes Llama-family models; nanotune writes no GGUF for"
                            f" {type(model).__name__} (use --export-onnx)")
    model = model.eval().float()
    gguf_file.write(model, tokenizer, path, kind)
    back = read_back(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = float((model(ids) - back(ids)).abs().max())
    prompt = ids[0, :6].tolist()
    expected = generate(back, [prompt], 32, 0, None, temperature=0)[0]
    same = generate(model, [prompt], 32, 0, None, temperature=0)[0] == expected
    size = Path(path).stat().st_size / 2**20
    print(f"wrote {path} ({kind}, {size:,.1f} MiB); read back, its logits differ from nanotune's by at most"
          f" {difference:.2e}, and its 32 greedy tokens are {'the same' if same else 'not all the same'}")
    ok = kind != "f32" or (difference <= 1e-4 and same)
    if importlib.util.find_spec("llama_cpp") is not None:
        ok = check_in_llama_cpp(path, tokenizer, prompt, expected) and ok
    return 0 if ok else 1


def read_back(path):
    """The model in a GGUF file, built from the file's tensors in memory (gguf_file.read)."""
    from .. import hub
    from ..gguf_file import read
    from ..llama import Llama, LlamaConfig, inverse_frequencies
    config, _, _, tensors = read(path)
    config = hub.config_from_dict(LlamaConfig, config)
    with torch.device("meta"):                  # no memory for weights yet: the file's tensors are them
        model = Llama(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise NanotuneError(f"--export-gguf: the file written does not read back as the model (missing"
                            f" {missing}, unexpected {unexpected}); this is a bug in nanotune, please report it")
    model.inv_freq = inverse_frequencies(config)
    model.tie_weights()
    return model.eval()


def check_in_llama_cpp(path, tokenizer, prompt, expected, text="A penguin walks into a bar in 1999. It's cold!"):
    """Load the file in llama.cpp (llama-cpp-python): it must accept the file, cut `text` into the
    same tokens as nanotune, and continue `prompt` greedily with the `expected` tokens (those of the
    model read back; exact for f32, within rounding for f16 and q8_0). Says what it found."""
    import llama_cpp
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + len(expected) + 8, verbose=False)
    except Exception as e:           # llama.cpp refuses the file (a ValueError carrying its log line)
        print(f"llama.cpp does NOT load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return False
    theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
    same_tokens = theirs == tokenizer.encode(text, add_special_tokens=False)
    continuation = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        continuation.append(token)
        if len(continuation) == len(expected):
            break
    same_greedy = continuation == expected
    llm.close()
    print(f"llama.cpp loads it; its tokens for {text!r} are {'the same' if same_tokens else 'NOT the same'}, and its"
          f" {len(expected)} greedy tokens are {'the same' if same_greedy else 'not all the same'}")
    return same_tokens
