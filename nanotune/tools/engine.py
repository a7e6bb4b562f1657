"""Continuous batching: the serving engine that decodes many requests' sequences together, and lets
new ones in at every step instead of when a whole batch is done.

    running: the sequences being decoded, at most --max-batch; each owns a slot of the key/value cache
    waiting: the sequences of requests that arrived, in order

Every step: the sequences that finished (an end-of-text or end-of-turn token, a stop string, their
length, a client that went away) leave and free their slots; waiting sequences take the free slots
(each one's prompt run through the model alone, its keys and values copied into its slot, its first
token drawn), in order of arrival and only while the cache, with room for every admitted sequence's
prompt and max_tokens, stays within its budget (--cache-budget); then one forward pass decodes
the next token of every running sequence. When none is left, the cache is freed. A request
that arrives while others are decoding waits one step, not until they are all done: that is what
the batch-to-the-end server got wrong (vLLM's and TGI's idea, in plain code).

The key/value cache is one tensor per layer, (slots, key/value heads, positions, head size), grown
when a longer sequence arrives; each slot's sequence has its own length, and a mask keeps every row
to its own positions. Paging (vLLM) would cut the cache into fixed blocks handed out as sequences
grow, so that memory follows the tokens actually held rather than each slot's longest sequence, and
would let sequences share the blocks of a common prefix; at one machine's scale, a tensor suffices.
"""
import collections
import ctypes
import sys
import threading

import torch

from .. import tricks
from ..generation import next_tokens

CHUNK = 256                  # prompt positions whose log-probabilities (echo) are computed at once


class Detokenizer:
    """A sequence's text, grown a token at a time. Decoding every token again at every step costs
    the square of the length; here each step decodes only a short window: from the start of the
    previous token's text (so that a tokenizer which drops the space before a text's first word
    still sees a word before it) to the new token. A token that is half of a character (byte-level
    BPE splits some) adds nothing until the token that completes it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.text, self.held = "", ""      # the text of complete characters; the decoded tail still incomplete
        self.start = self.done = 0         # ids[start:done]: the previous token's text, already in self.text

    def add(self, token):
        """The text that `token` completes ("" while a character is still incomplete)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.start:self.done])
        after = self.tokenizer.decode(self.ids[self.start:])
        if after.endswith("\ufffd") and len(self.ids) - self.done < 4:    # a character is at most 4 bytes
            self.held = after[len(before):]
            return ""
        piece, self.held = after[len(before):], ""
        self.text += piece
        # bytes that never made a character (4 tokens on) stay out of the next window: had they
        # formed one with what follows, the window would no longer begin with its previous text
        self.start, self.done = len(self.ids) if after.endswith("\ufffd") else self.done, len(self.ids)
        return piece


class Sequence:
    """One choice being decoded: its prompt, its settings, the tokens so far, their text (and each
    token's share of it when log-probabilities are asked for) and why it ended."""

    def __init__(self, request, index, prompt, generator):
        self.request, self.index, self.prompt, self.generator = request, index, prompt, generator
        self.tokens, self.text, self.finish_reason, self.logprobs, self.pieces = [], "", None, [], []
        self.decoded = None                # a Detokenizer, from the engine
        self.prompt_text, self.prompt_pieces, self.prompt_logprobs = "", [], []      # for echo


class Request:
    """A request's sequences (n for each prompt) and its settings. `emit(kind, sequence)` is called
    from the engine's thread: ("token", s) after each new token, ("done", s) when s has ended."""

    def __init__(self, prompts, settings, emit):
        self.settings, self.emit, self.cancelled = settings, emit, False
        seed, n = settings.get("seed"), settings["n"]
        self.sequences = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                generator = torch.Generator()
                if seed is not None:       # each choice its own stream, so its tokens do not depend on who else runs
                    generator.manual_seed((seed * 1_000_003 + i * n + j) % 2**64)     # torch takes 64 bits
                else:
                    generator.seed()
                self.sequences.append(Sequence(self, i * n + j, prompt, generator))


class SlotCache:
    """The running sequences' keys and values, as the model's attention layers use a cache: each row
    writes its new position at its own length, and reads its slot's positions up to the longest."""

    def __init__(self, engine, rows):
        self.engine, self.rows = engine, rows
        self.length = max(engine.lengths[:rows])          # the longest sequence's past: S - 1 keys before the new one

    def update(self, layer, k, v):                       # k, v: (B, nkv, 1, hs)
        e, rows = self.engine, torch.arange(self.rows)
        at = torch.tensor(e.lengths[:self.rows])
        e.k[layer, rows, :, at] = k[:, :, 0]
        e.v[layer, rows, :, at] = v[:, :, 0]
        return e.k[layer, :self.rows, :, :self.length + 1], e.v[layer, :self.rows, :, :self.length + 1]

    def advance(self, positions):
        pass                                               # the engine moves each row's length itself


class Engine:
    """continuous=False admits newcomers only when every running sequence has ended: the batch runs
    to its end, as servers without continuous batching do (bench/serve.py compares the two)."""

    def __init__(self, model, tokenizer, max_batch, stops, continuous=True, budget=None):
        self.model, self.tokenizer, self.max_batch, self.stops = model, tokenizer, max_batch, set(stops)
        self.continuous, self.budget = continuous, budget if budget is not None else float("inf")
        self.layers, self.heads, self.head_size = model.cache_layout()
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        # bytes of cache per sequence position: a key and a value vector per layer and key/value head
        self.position_bytes = 2 * self.layers * self.heads * self.head_size * self.dtype.itemsize
        self.running, self.lengths, self.pending = [], [], []   # slot i: its sequence, its length, its next input
        self.waiting = collections.deque()
        self.k = self.v = torch.empty(self.layers, 0, self.heads, 0, self.head_size)
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="nanotune-engine", daemon=True)
        self.thread.start()

    def submit(self, request):
        with self.wake:
            self.waiting.extend(request.sequences)
            self.wake.notify()

    def stop(self, cancel=False):
        """Finish every request (cancel=True: drop them) and end the loop."""
        with self.wake:
            if cancel:
                for s in self.running + list(self.waiting):
                    s.request.cancelled = True
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    # ---- the loop -------------------------------------------------------------------------------
    def loop(self):
        with torch.inference_mode(), tricks.packed_linears(self.model, self.max_batch):
            while True:
                with self.wake:
                    if not self.running and self.k.numel():
                        self.release()                   # idle: the cache goes back to the machine
                    while not (self.running or self.waiting or self.stopping):
                        self.wake.wait()
                    if self.stopping and not (self.running or self.waiting):
                        return
                    free = self.max_batch - len(self.running) if self.continuous or not self.running else 0
                    newcomers = []                       # in order of arrival, while the cache stays in budget
                    while self.waiting and len(newcomers) < free and self.fits(newcomers + [self.waiting[0]]):
                        newcomers.append(self.waiting.popleft())
                    if self.waiting and not self.running and not newcomers:    # too big even alone
                        s = self.waiting.popleft()
                        s.finish_reason = "error"
                        s.request.emit("error", "this sequence's key/value cache is over the server's budget")
                try:
                    for s in newcomers:
                        if s.request.cancelled:          # its client left while it waited
                            s.finish_reason = "cancelled"
                            s.request.emit("done", s)
                            continue
                        self.admit(s)                    # prefill, then join the running batch
                    self.retire()                        # (a first token can end a sequence)
                    if self.running:
                        self.step()                      # one token for every running sequence
                    self.retire()
                except Exception as e:                   # a bug must not take the server down for everyone else
                    for s in self.running + newcomers:
                        s.finish_reason = s.finish_reason or "error"
                        s.request.emit("error", f"{type(e).__name__}: {e}")
                    self.running, self.lengths, self.pending = [], [], []

    def admit(self, s):
        """Run the prompt alone, keep its keys and values in a free slot, draw the first token."""
        from ..generation import KVCache
        s.decoded = Detokenizer(self.tokenizer)
        ids = torch.tensor([s.prompt], device=self.device)
        cache = KVCache(self.layers, self.heads, self.head_size, 1, len(s.prompt), self.device, self.dtype)
        hidden = self.model.hidden_states(ids, None, None, cache)
        if s.request.settings.get("echo"):
            self.echo(s, hidden[0])
        if s.request.settings["max_tokens"] == 0:       # the prompt scored, nothing to write: no slot taken
            s.finish_reason = "length"
            s.request.emit("done", s)
            return
        slot = len(self.running)
        self.reserve(slot + 1, len(s.prompt) + s.request.settings["max_tokens"])
        self.k[:, slot, :, :len(s.prompt)] = cache.k[:, 0]
        self.v[:, slot, :, :len(s.prompt)] = cache.v[:, 0]
        self.running.append(s)
        self.lengths.append(len(s.prompt))
        self.pending.append(None)
        self.choose(slot, self.model.lm_head(hidden[:, -1]).float()[0])

    def echo(self, s, hidden):
        """The prompt's text, each token's share of it (the Detokenizer: a short window per token, never
        the whole text again), and with logprobs each token's log-probability given the tokens before it
        (position t predicts token t+1) and the likeliest tokens there. The vocabulary's logits are made
        CHUNK positions at a time, so that a long prompt never holds (positions, vocabulary) at once."""
        decoded = Detokenizer(self.tokenizer)
        s.prompt_pieces = [decoded.add(t) for t in s.prompt]
        s.prompt_pieces[-1] += decoded.held
        s.prompt_text = "".join(s.prompt_pieces)
        k = s.request.settings["logprobs"]
        if k is None:
            return
        targets = torch.tensor(s.prompt[1:], device=self.device)                    # (T-1,)
        for start in range(0, len(targets), CHUNK):
            lp = self.model.lm_head(hidden[start:min(start + CHUNK, len(targets))]).float().log_softmax(-1)
            picked = lp.gather(-1, targets[start:start + CHUNK, None])[:, 0].tolist()
            top = lp.topk(k) if k else None
            for row, (token, value) in enumerate(zip(targets[start:start + CHUNK].tolist(), picked)):
                s.prompt_logprobs.append((token, value, [] if top is None else
                                          list(zip(top.indices[row].tolist(), top.values[row].tolist()))))

    # ---- the key/value cache's memory ------------------------------------------------------------
    def need(self, s):
        """Positions a sequence may fill: its prompt and every token it may add."""
        return len(s.prompt) + s.request.settings["max_tokens"]

    def fits(self, newcomers):
        """Would the cache, with room for the running sequences and these, stay within the budget?
        It is one tensor: as many places as sequences, each as long as the longest one needs."""
        slots = max(len(self.running) + len(newcomers), self.k.shape[1])
        positions = max([self.k.shape[3]] + [self.need(s) for s in self.running + newcomers])
        return slots * positions * self.position_bytes <= self.budget

    def release(self):
        """Free the cache, and ask the C library to hand the freed pages back to the system (it
        keeps them otherwise, the more so under tricks.keep_freed_memory)."""
        self.k = self.v = torch.empty(self.layers, 0, self.heads, 0, self.head_size)
        malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None
        if malloc_trim is not None:
            malloc_trim(0)

    def reserve(self, slots, positions):
        """Grow the cache to hold `slots` sequences of `positions` each: the dimension that is short
        doubles (so growing is rare), up to --max-batch slots, the model's context and the budget;
        the other stays."""
        have_slots, have_positions = self.k.shape[1], self.k.shape[3]
        if slots <= have_slots and positions <= have_positions:
            return
        wanted = max(slots, have_slots), max(positions, have_positions)
        if slots > have_slots:
            slots = min(max(slots, 2 * have_slots), self.max_batch)
        if positions > have_positions:
            positions = min(max(positions, 2 * have_positions), self.model.config.context)
        slots, positions = max(slots, have_slots), max(positions, have_positions)
        if slots * positions * self.position_bytes > self.budget:
            slots, positions = wanted                   # no room to spare: exactly what is needed
        shape = (self.layers, slots, self.heads, positions, self.head_size)
        k, v = (torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(2))
        k[:, :have_slots, :, :have_positions], v[:, :have_slots, :, :have_positions] = self.k, self.v
        self.k, self.v = k, v

    def step(self):
        """One forward pass for every running sequence: its pending token at its own position, looking
        at its own keys only (the mask), then a choice of the next token for each."""
        B = len(self.running)
        cache = SlotCache(self, B)
        S = cache.length + 1
        lengths = torch.tensor(self.lengths, device=self.device)
        keys = torch.arange(S, device=self.device)[None, :]
        mask = keys <= lengths[:, None]                                            # (B, S): its past and itself
        window = getattr(self.model.config, "window", None)
        if window is not None:
            mask &= keys > lengths[:, None] - window
        tokens = torch.tensor(self.pending, device=self.device)[:, None]           # (B, 1)
        hidden = self.model.hidden_states(tokens, mask[:, None, None, :], lengths[:, None], cache)
        logits = self.model.lm_head(hidden[:, -1]).float()                         # (B, V)
        for slot in range(B):
            self.lengths[slot] += 1
            self.choose(slot, logits[slot])

    def choose(self, slot, logits):
        """The slot's next token, by its own settings; its text, and whether it has ended."""
        s = self.running[slot]
        if s.finish_reason is not None:
            return
        settings = s.request.settings
        token = int(next_tokens(logits[None], settings["temperature"], None, settings["top_p"], s.generator)[0])
        if settings.get("logprobs") is not None:        # the chosen token's log-probability, and the k likeliest
            lp = logits.log_softmax(-1)
            top = lp.topk(settings["logprobs"]) if settings["logprobs"] else None
            s.logprobs.append((token, float(lp[token]), [] if top is None else list(zip(top.indices.tolist(),
                                                                                          top.values.tolist()))))
        if token in self.stops:
            s.finish_reason = "stop"
            return
        s.tokens.append(token)
        self.pending[slot] = token
        seen = len(s.decoded.text)
        piece = s.decoded.add(token)
        if settings.get("logprobs") is not None:
            s.pieces.append(piece)
        text = s.decoded.text + s.decoded.held
        # a stop string not found before ends in the new text: look only there
        found = [text.find(x, max(0, seen - len(x) + 1)) for x in settings["stop"]]
        cut = min((i for i in found if i >= 0), default=-1)
        s.text = text if cut < 0 else text[:cut]
        if cut >= 0:
            s.finish_reason = "stop"
        elif len(s.tokens) >= settings["max_tokens"]:
            s.finish_reason = "length"
        if s.request.cancelled:
            s.finish_reason = "cancelled"
        s.request.emit("token", s)

    def retire(self):
        """Finished sequences leave: the last running sequence moves into each freed slot, so that
        the running ones always fill slots 0..B-1."""
        slot = 0
        while slot < len(self.running):
            s = self.running[slot]
            if s.request.cancelled and s.finish_reason is None:
                s.finish_reason = "cancelled"
            if s.finish_reason is None:
                slot += 1
                continue
            last = len(self.running) - 1
            if slot != last:
                n = self.lengths[last]
                self.k[:, slot, :, :n], self.v[:, slot, :, :n] = self.k[:, last, :, :n], self.v[:, last, :, :n]
                self.running[slot], self.lengths[slot], self.pending[slot] = (self.running[last], self.lengths[last],
                                                                              self.pending[last])
            self.running.pop(), self.lengths.pop(), self.pending.pop()
            s.request.emit("done", s)
