"""A continuous-batching decode engine: token ids in, token ids out, shared by every caller.

A fixed number of slots share one preallocated KV cache [slots, n_kv_head, max_len, head_dim] per
layer. Each `step` runs ONE forward: a decode row for every occupied slot, each at its own position,
together with the prompt chunks of requests being admitted (a mixed batch, as in llama.cpp and vLLM:
the weights are read once per step, however many prompts join), then samples every row with its
request's own settings. A fully fed prompt draws its first tokens in that same step; n samples copy
its cache to n slots. Finished and cancelled samples free their slot at once. Prefill is chunked: a
step feeds at most `prefill_chunk` prompt tokens, so a long prompt joins over several steps instead
of stalling every stream in flight for the whole of its prefill.

An encoder-decoder (T5, BART) runs in the same slots: a request's prompt is its source, encoded
when it is admitted (the sources admitted together in one padded forward), with each decoder
layer's cross-attention keys and values stored in its slots (computed once per request); it then
decodes from the decoder's start token in the same batched steps as every other request.

Use it synchronously (`Engine.generate`, or iterate a `Handle`: iteration runs steps in the
caller's thread) or start its loop in a background thread (`start`/`close`, or `with Engine(...)`)
and read each handle's events from its thread-safe queue.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..core.errors import LMForgeError
from ..core.runtime import autocast, eval_mode
from ..models.blas import blas_matmuls
from ..models.cache import KVCache
from ..models.quant import Int4Linear, Int8Linear
from ..models.transformer import InferenceLinear, Transformer
from .grammar import Grammar, forbidden_tokens
from .prefix_cache import PrefixCache
from .sampling import MIN_TEMPERATURE, filter_probs, penalize_counts, penalize_repeats, validate_sampling


@dataclass
class Request:
    """One prompt and its own sampling settings. max_tokens None: as many as fit in the context;
    seed: sample i of n uses seed + i; logprobs K > 0 adds the top-K candidates at each step;
    grammar: only tokens it allows are drawn, and the sample ends when it is complete;
    logit_bias: {token id: value added to its logit} (OpenAI's, -100..100)."""

    prompt: list[int]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Collection[int] = ()
    logprobs: int = 0
    n: int = 1
    grammar: Grammar | None = None
    logit_bias: dict[int, float] | None = None


@dataclass
class Event:
    """A new token of sample `index` (finish_reason None), or that sample's last event.

    token: its id; logprob: log of its probability in the distribution it was drawn from (after
    temperature/top-k/top-p; for greedy, the model's own); rank: its rank there (1 = most likely;
    only with logprobs, else 0); top: [(token, logprob)] of the K most likely, best first.
    Last event: finish_reason "stop" (a stop id, not emitted, in `stop_token`; or a grammar
    complete, stop_token None), "length" (max_tokens), "cancelled" or "error" (with `error`);
    prompt_tokens and completion_tokens (tokens emitted) are set.
    """

    index: int = 0
    token: int = -1
    logprob: float = 0.0
    rank: int = 0
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    stop_token: int | None = None


@dataclass
class Sample:
    """One finished sample: its tokens with their logprobs and candidates, why it ended, and for
    finish_reason "stop" the stop id that ended it (None when a grammar completed it)."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    finish_reason: str
    stop_token: int | None = None


class Handle:
    """A submitted request: iterate it for its events (all n samples, interleaved), `cancel()` it,
    or read `events` (a queue.Queue) directly from another thread. (With `Engine.on_step` set,
    events go to that instead; `sink` is the caller's, to route them.)"""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.engine, self.request = engine, request
        self.events: queue.Queue[Event] = queue.Queue()
        self.sink = None
        self.cancelled = False
        self.dropped: set[int] = set()  # samples cancelled one by one
        self._open = request.n  # samples not finished yet (counted by the consumer)

    def cancel(self, index: int | None = None) -> None:
        """Stop generating (sample `index` of n, or all of them): the engine frees the slots at its
        next step, and the sample(s) end with finish_reason "cancelled"."""
        if index is None:
            self.cancelled = True
        else:
            self.dropped.add(index)

    def __iter__(self) -> Iterator[Event]:
        while self._open:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                if self.engine.running:
                    event = self.events.get()
                else:
                    if not self.engine.step() and self.events.empty():
                        raise LMForgeError("the engine has nothing to run for this request") from None
                    continue
            if event.finish_reason is not None:
                self._open -= 1
            yield event

    def result(self) -> list[Sample]:
        """Run to the end; one `Sample` per n. An engine failure is raised."""
        samples = [Sample([], [], [], "") for _ in range(self.request.n)]
        for e in self:
            s = samples[e.index]
            if e.finish_reason is None:
                s.tokens.append(e.token)
                s.logprobs.append(e.logprob)
                s.top.append(e.top)
            elif e.finish_reason == "error":
                raise LMForgeError(e.error or "the engine failed")
            else:
                s.finish_reason, s.stop_token = e.finish_reason, e.stop_token
        return samples


class _Seq:
    """One sample in a slot: where it stands and how it draws its tokens."""

    def __init__(self, handle: Handle, index: int, slot: int, device) -> None:
        r = handle.request
        self.handle, self.index, self.slot, self.r = handle, index, slot, r
        self.length = len(r.prompt)  # entries in the cache
        self.last = -1  # the token to feed next
        self.room = handle.engine.room(r)  # the most tokens it may write
        self.emitted = 0
        self.out: list[int] = []  # the tokens emitted (the cache holds (prompt + out)[:length])
        self.gen = torch.Generator().manual_seed(r.seed + index) if r.seed is not None else None
        self.greedy = r.temperature <= 0
        self.seen = self.counts = None
        self.matcher = r.grammar.matcher() if r.grammar is not None else None
        if r.repetition_penalty != 1.0:  # tokens already in the text (a decoder's prompt included)
            self.seen = torch.zeros(handle.engine.vocab, dtype=torch.bool, device=device)
            if not handle.engine.seq2seq:  # an encoder-decoder's source is not its text (as transformers)
                self.seen[torch.tensor(r.prompt, device=device)] = True
        if r.presence_penalty or r.frequency_penalty:  # generated tokens only (OpenAI)
            self.counts = torch.zeros(handle.engine.vocab, dtype=torch.int32, device=device)

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen is not None:
            logits = penalize_repeats(logits, self.seen, self.r.repetition_penalty)
        if self.counts is not None:
            logits = penalize_counts(logits, self.counts, self.r.presence_penalty, self.r.frequency_penalty)
        return logits

    def record(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


@dataclass
class _Prefill:
    """A request whose prompt is being fed into its first slot, `fed` tokens so far."""

    handle: Handle
    slots: list[int]
    fed: int = 0


class Engine:
    """Continuous batching over `slots` sequences of up to `max_len` tokens (default: the context)."""

    def __init__(self, model: Transformer, slots: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512, prefix_cache: PrefixCache | None = None) -> None:
        cfg = model.cfg
        if slots < 1 or prefill_chunk < 1:
            raise LMForgeError(f"the engine needs at least one slot and a prefill chunk of at least one token "
                               f"(got {slots}, {prefill_chunk})")
        self.prefill_chunk = prefill_chunk
        # Keys and values of prefixes seen before (see prefix_cache.py). Only for fixed weights: a
        # cache outlives the step that filled it, so a model being trained must not have one.
        # An encoder-decoder's decoder starts from its own start token, not from the prompt (its
        # source): no decoder prefix to share.
        self.seq2seq = cfg.is_encoder_decoder
        self.prefix_cache = None if self.seq2seq else prefix_cache
        self._pending: list[_Prefill] = []  # admitted prompts not fully fed yet (in order)
        self.model, self.slots = model, slots
        # Each step runs the model in eval mode and then puts back the modes it found: a policy being
        # trained (RL rollouts) stays in train mode between steps, and its dropout never touches a draw.
        self._modules = list(model.modules())
        self.vocab, self.max_len = cfg.vocab_size, min(max_len or cfg.context_length, cfg.context_length)
        self.device = next(model.parameters()).device
        # A CPU float32 model set up by `for_inference` multiplies through numpy's BLAS (models/blas.py);
        # not one with other linear layers (int8, int4, LoRA), which need torch's threads.
        linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear, Int4Linear))]
        self._blas = self.device.type == "cpu" and bool(linears) and all(
            type(m) is InferenceLinear and m.weight.dtype == torch.float32 for m in linears)
        self.cache = model.new_cache(slots, self.max_len)
        self._views: dict[tuple[int, int], KVCache] = {}
        self._free = list(range(slots))  # kept sorted: the lowest slot first keeps the batch short
        self._active: dict[int, _Seq] = {}  # slot -> sample
        self._waiting: deque[Handle] = deque()
        self._lock = threading.RLock()  # one step at a time
        self._wake = threading.Condition()  # guards the waiting queue; submitters never wait for a step
        self._thread: threading.Thread | None = None
        self._closing = False
        # Optional: receives each step's events at once, [(handle, event)], in the engine's thread
        # (a server relays them to its event loop with one wake-up per step, not one per stream).
        self.on_step: Callable[[list[tuple[Handle, Event]]], None] | None = None
        self._batch: list[tuple[Handle, Event]] | None = None
        self._mask_pool: ThreadPoolExecutor | None = None  # computes grammar masks beside the forward pass

    # -- submitting -------------------------------------------------------------------------

    def check(self, r: Request) -> None:
        """A one-line LMForgeError for a request this engine cannot run."""
        validate_sampling(r.temperature, r.top_k, r.top_p, r.repetition_penalty, r.max_tokens, r.n,
                          r.presence_penalty, r.frequency_penalty)
        if not r.prompt:
            raise LMForgeError("the prompt is empty")
        if min(r.prompt) < 0 or max(r.prompt) >= self.vocab:
            raise LMForgeError(f"prompt token ids must lie in 0..{self.vocab - 1}")
        room = self.room(r)
        if self.seq2seq and self.model.cfg.decoder_start_token_id is None:
            raise LMForgeError("this encoder-decoder has no decoder_start_token_id (set it in its config.json)")
        if self.seq2seq and len(r.prompt) > self.model.cfg.context_length:
            raise LMForgeError(f"the source is {len(r.prompt)} tokens; the model's context is "
                               f"{self.model.cfg.context_length}")
        if self.seq2seq and r.max_tokens is not None and r.max_tokens > room:
            raise LMForgeError(f"max_tokens {r.max_tokens} exceeds the decoder's {room} positions")
        if r.max_tokens is not None and r.max_tokens > room or room < 1:
            raise LMForgeError(f"max_tokens {r.max_tokens or 1} plus the prompt's {len(r.prompt)} tokens exceeds the "
                               f"context length of {self.max_len} tokens")
        if r.n > self.slots:
            raise LMForgeError(f"n={r.n} exceeds the engine's {self.slots} slots")
        if r.logprobs < 0:
            raise LMForgeError(f"logprobs must be >= 0 (got {r.logprobs})")
        for t, v in (r.logit_bias or {}).items():
            if not 0 <= t < self.vocab or not -100 <= v <= 100:
                raise LMForgeError(f"logit_bias maps token ids 0..{self.vocab - 1} to values in -100..100 "
                                   f"(got {t}: {v})")

    def room(self, r: Request) -> int:
        """The most tokens a request may write: the context left after its prompt (an encoder-
        decoder's decoder has its own positions)."""
        return self.max_len if self.seq2seq else self.max_len - len(r.prompt)

    def submit(self, request: Request) -> Handle:
        """Queue a request (from any thread); it joins the batch at the next step."""
        self.check(request)
        handle = Handle(self, request)
        with self._wake:
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        """Run requests together to the end; per request, one `Sample` per n."""
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    def waiting(self) -> int:
        """How many submitted requests wait for free slots (e.g. to bound a server's queue)."""
        with self._wake:
            return len(self._waiting)

    def active(self) -> int:
        """How many slots hold a running sample now."""
        return len(self._active)

    # -- the loop ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> Engine:
        """Run steps in a background thread until `close()`."""
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background thread; unfinished requests end with finish_reason "cancelled"."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._mask_pool is not None:
            self._mask_pool.shutdown()
            self._mask_pool = None
        with self._lock:
            for seq in list(self._active.values()):
                self._finish(seq, "cancelled")
            self._drop_pending("cancelled")
            for h in self._take_waiting():
                self._end(h, "cancelled")

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The model to oneself between two steps, in eval mode: no step runs until the block ends.
        For work that changes the shared model for one forward (`Transformer.inspect` sets its
        attention layers to keep their weights), which a step running beside it would disturb."""
        with self._lock, eval_mode(self._modules):
            yield

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not self._active and not self._pending:
                    self._wake.wait()
                if self._closing:
                    return
            try:
                self.step()
            except Exception as e:  # fail every request rather than leave readers blocked
                self._fail_all(_error_line(e))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            for seq in list(self._active.values()):
                self._finish(seq, "error", message)
            self._drop_pending("error", message)
            for h in self._take_waiting():
                self._end(h, "error", message)

    def _take_waiting(self) -> list[Handle]:
        with self._wake:
            taken = list(self._waiting)
            self._waiting.clear()
        return taken

    def step(self) -> bool:
        """Admit what fits, then decode one token for every occupied slot. False when idle."""
        with self._lock, (blas_matmuls() if self._blas else contextlib.nullcontext()), eval_mode(self._modules):
            if self.on_step is None:
                return self._step()
            self._batch = []
            try:
                return self._step()
            finally:
                batch, self._batch = self._batch, None
                if batch:
                    self.on_step(batch)

    def _emit(self, handle: Handle, event: Event) -> None:
        if self._batch is not None:
            self._batch.append((handle, event))
        elif self.on_step is not None:
            self.on_step([(handle, event)])
        else:
            handle.events.put(event)

    @torch.no_grad()
    def _step(self) -> bool:
        for seq in [s for s in self._active.values() if s.handle.cancelled or s.index in s.handle.dropped]:
            self._finish(seq, "cancelled")
        chunks = self._encode_sources() if self.seq2seq else self._plan()
        seqs = sorted(self._active.values(), key=lambda s: s.slot)
        if not chunks and not seqs:
            return False
        # The grammar masks depend only on what each sample has written so far: compute them in a
        # worker thread while the model runs (llguidance and torch both release the GIL).
        ruled = [s for s in seqs if s.matcher is not None]
        masks = self._masker().submit(forbidden_tokens, [s.matcher for s in ruled], self.vocab) if ruled else None
        try:
            logits = self._forward(seqs, chunks)
        except Exception as e:
            if not chunks:
                raise
            for p, _ in chunks:  # the new prompts end here (not in slots yet), or readers would wait forever
                self._drop(p, "error", _error_line(e))
            if not self.running:
                raise  # a synchronous caller gets the exception itself
            if not seqs:
                return True
            # in the background, a failed prefill (e.g. out of memory) spares the streams in flight
            chunks = []
            logits = self._forward(seqs, chunks)
        for s in seqs:
            s.length += 1
        placed, rows = [], list(range(len(seqs)))  # each sample's row of `logits`
        for i, p in enumerate(p for p, _ in chunks if p.fed == len(p.handle.request.prompt)):
            new = self._place(p)  # a prompt fully fed: its n samples draw their first tokens now
            placed += new
            rows += [len(seqs) + i] * len(new)
        self._sample(seqs + placed, logits, rows, dict(zip(map(id, ruled), masks.result())) if masks else None)
        return True

    def _forward(self, seqs: list[_Seq], chunks: list[tuple[_Prefill, int]]) -> torch.Tensor:
        """One forward over the decode rows and the prompt chunks; logits [len(seqs) + prompts fully
        fed, vocab]: each sample's row, then each finished prompt's last position."""
        with autocast(self.device):
            if len(seqs) + len(chunks) == 1:  # one sequence: the plain cache path, exactly as generate_ids runs
                if seqs:
                    slot, start, ids = seqs[0].slot, seqs[0].length, [seqs[0].last]
                else:
                    p, take = chunks[0]
                    slot, start, ids = p.slots[0], p.fed, p.handle.request.prompt[p.fed:p.fed + take]
                view = self._view(slot, slot + 1)
                view.pos = start
                h = self._hidden(torch.tensor([ids], device=self.device), view)[:, -1]
            else:
                hi = seqs[-1].slot + 1 if seqs else 0
                tokens, pos = [0] * hi, [0] * hi  # empty slots decode a dummy token at 0...
                for p, _ in chunks:  # ...and a prompt's slot at its chunk's start, which the chunk overwrites
                    if p.slots[0] < hi:
                        pos[p.slots[0]] = p.fed
                for s in seqs:
                    tokens[s.slot], pos[s.slot] = s.last, s.length
                rows = torch.tensor(pos, device=self.device) if hi else None
                if self.seq2seq:  # decode rows only: an encoder-decoder's prompt went to the encoder
                    view = self._view(0, hi).at(rows, max(pos) + 1)
                    h = self._hidden(torch.tensor(tokens, device=self.device)[:, None], view)[:, -1]
                    h = h[[s.slot for s in seqs]]
                else:
                    parts, ends = [], []  # each chunk's prompt tokens, and each finished prompt's last position
                    for p, take in chunks:
                        parts.append((p.slots[0], p.fed, take))
                        tokens += p.handle.request.prompt[p.fed:p.fed + take]
                        if p.fed + take == len(p.handle.request.prompt):
                            ends.append(len(tokens) - 1)
                    view = self.cache.mix(rows, parts)
                    h = self.model.hidden(torch.tensor([tokens], device=self.device), cache=view)[0]
                    h = h[[s.slot for s in seqs] + ends]
            logits = self.model.head(h)
        for p, take in chunks:
            p.fed += take
        return logits

    def _hidden(self, ids: torch.Tensor, view: KVCache) -> torch.Tensor:
        if self.seq2seq:  # the decoder, reading each row's cross-attention entries from the cache
            self.cache.cross_span = max(len(s.r.prompt) for s in self._active.values())  # the longest source now
            return self.model.decode(ids, cache=view)
        return self.model.hidden(ids, cache=view)

    def _encode_sources(self) -> list:
        """An encoder-decoder's admissions: the waiting requests that fit (sources of up to
        `prefill_chunk` tokens in all, at least one request) are encoded in one padded forward;
        each stores its cross-attention keys and values in its n slots and starts decoding from the
        start token in this step. Returns no prompt chunks (the decoder has no prompt)."""
        handles, width = [], 0

        def fits(r: Request) -> bool:  # the padded batch, not only its real tokens, within the budget
            return not handles or (len(handles) + 1) * max(width, len(r.prompt)) <= self.prefill_chunk

        while (h := self._next_waiting(fits)) is not None:
            handles.append((h, [self._free.pop(0) for _ in range(h.request.n)]))
            width = max(width, len(h.request.prompt))
        if not handles:
            return []
        ids = torch.zeros(len(handles), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(handles), width, dtype=torch.bool, device=self.device)
        for i, (h, _) in enumerate(handles):
            ids[i, :len(h.request.prompt)] = torch.tensor(h.request.prompt, device=self.device)
            mask[i, :len(h.request.prompt)] = True
        try:
            with autocast(self.device):
                memory = self.model.encode(ids, mask)
                for i, (_, slots) in enumerate(handles):
                    self.model.remember(self.cache, memory[i:i + 1], mask[i:i + 1],
                                        torch.tensor(slots, device=self.device))
        except Exception as e:  # not in slots yet: end them here, or their readers would wait forever
            for h, slots in handles:
                self._release(h, slots, "error", _error_line(e))
            if not self.running:
                raise
            return []
        start = self.model.cfg.decoder_start_token_id
        for h, slots in handles:
            for i, slot in enumerate(slots):
                s = self._active[slot] = _Seq(h, i, slot, self.device)
                s.length, s.last = 0, start
        return []

    def _masker(self) -> ThreadPoolExecutor:
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="lmforge-masks")
        return self._mask_pool

    def _view(self, start: int, stop: int) -> KVCache:
        view = self._views.get((start, stop))
        if view is None:
            view = self._views[(start, stop)] = self.cache.view(start, stop)
        return view

    def _next_waiting(self, fits: Callable[[Request], bool] | None = None) -> Handle | None:
        """The first waiting request if its n samples fit in the free slots now, and `fits` it (FIFO:
        a large n is not overtaken forever); cancelled ones end here without running."""
        with self._wake:
            while self._waiting and self._waiting[0].cancelled:
                self._end(self._waiting.popleft(), "cancelled")
            first = self._waiting[0] if self._waiting else None
            if first and len(self._free) >= first.request.n and (fits is None or fits(first.request)):
                return self._waiting.popleft()
        return None

    def _plan(self) -> list[tuple[_Prefill, int]]:
        """This step's prompt chunks, up to `prefill_chunk` tokens in all: the prompt in progress
        first, then waiting ones in order, each taking its n slots (and any cached prefix) as it
        starts. [(prompt, tokens to feed)]."""
        for p in [p for p in self._pending if p.handle.cancelled]:
            self._drop(p, "cancelled")
        budget, chunks = self.prefill_chunk, []
        while budget > 0:
            if len(chunks) == len(self._pending):
                h = self._next_waiting()
                if h is None:
                    break
                p = _Prefill(h, [self._free.pop(0) for _ in range(h.request.n)])
                if self.prefix_cache is not None:  # start after the longest prefix already computed
                    p.fed = self.prefix_cache.load(h.request.prompt, self.cache, p.slots[0])
                self._pending.append(p)
            p = self._pending[len(chunks)]
            take = min(budget, len(p.handle.request.prompt) - p.fed)
            chunks.append((p, take))
            budget -= take
        return chunks

    def _place(self, p: _Prefill) -> list[_Seq]:
        """A fully fed prompt: copy its cache to its other n - 1 slots; its samples take their slots."""
        self._pending.remove(p)
        L = len(p.handle.request.prompt)
        for other in p.slots[1:]:  # n samples share one prefill
            for k, v in zip(self.cache.k, self.cache.v):
                k[other, :, :L] = k[p.slots[0], :, :L]
                v[other, :, :L] = v[p.slots[0], :, :L]
        seqs = [_Seq(p.handle, i, slot, self.device) for i, slot in enumerate(p.slots)]
        for s in seqs:
            self._active[s.slot] = s
        self._keep_prefix(p.handle.request.prompt, p.slots[0])
        return seqs

    def _keep_prefix(self, tokens: list[int], slot: int) -> None:
        """Offer a slot's entries to the prefix cache. Called once the slot's bookkeeping is done: a
        failure here (out of memory for the copy) costs only the caching, never the request."""
        if self.prefix_cache is not None:
            try:
                self.prefix_cache.store(tokens, self.cache, slot)
            except (RuntimeError, MemoryError):
                pass

    def _drop(self, p: _Prefill, reason: str, error: str | None = None) -> None:
        """End a prompt not fully fed, and free its slots."""
        self._pending.remove(p)
        self._release(p.handle, p.slots, reason, error)

    def _release(self, h: Handle, slots: list[int], reason: str, error: str | None = None) -> None:
        """End a request that holds slots but no running sample yet."""
        self._free = sorted(self._free + slots)
        self._end(h, reason, error)

    def _drop_pending(self, reason: str, error: str | None = None) -> None:
        for p in list(self._pending):
            self._drop(p, reason, error)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor, rows: list[int],
                masks: dict[int, torch.Tensor] | None = None) -> None:
        """Draw each sample's next token from its row of `logits`, emit it, finish what ended.
        `masks`: the forbidden tokens of constrained samples, by id(sample), when already computed."""
        logits = logits.float()
        if any(s.matcher is not None or s.r.logit_bias for s in seqs):  # unconstrained batches skip this
            logits, rows = self._shape(seqs, logits, rows, masks or {})
        greedy = [(s, r) for s, r in zip(seqs, rows) if s.greedy]
        picks: dict[int, tuple[int, float, int, list]] = {}
        if greedy:  # all greedy rows at once, on the device: one small transfer, no vocab-sized one
            lg = logits[[r for _, r in greedy]]
            for i, (s, _r) in enumerate(greedy):
                if s.seen is not None or s.counts is not None:
                    lg[i] = s.penalize(lg[i])
            probs = torch.softmax(lg, dim=-1)
            tok = probs.argmax(-1)
            p = probs.gather(1, tok[:, None])[:, 0]
            k = min(max(s.r.logprobs for s, _ in greedy), self.vocab)
            if k:
                top_p, top_i = probs.topk(k, dim=-1)
                ranks = 1 + (probs > p[:, None]).sum(-1)
                out = torch.cat([tok[:, None].float(), p[:, None], ranks[:, None].float(), top_p,
                                 top_i.float()], 1).tolist()
            else:
                out = torch.stack([tok.float(), p], 1).tolist()
            for (s, _), row in zip(greedy, out):
                t, q = int(row[0]), row[1]
                top, rank = [], 0
                if s.r.logprobs:
                    rank, kk = int(row[2]), min(s.r.logprobs, self.vocab)
                    top = [(int(i), math.log(v)) for v, i in zip(row[3:3 + kk], row[3 + k:3 + k + kk]) if v > 0]
                picks[id(s)] = (t, q, rank, top)
        # Plain temperature sampling (no top-k/top-p/penalties): one softmax for all such rows, one
        # transfer; the draw stays per row, with each request's own generator.
        plain = [(s, r) for s, r in zip(seqs, rows) if not s.greedy and s.seen is None and s.counts is None
                 and s.r.top_k is None and (s.r.top_p is None or s.r.top_p >= 1)]
        batched = {}
        if len(plain) > 1:
            temps = [max(s.r.temperature, MIN_TEMPERATURE) for s, _ in plain]  # 1e-300 would give NaNs
            temps = torch.tensor(temps, device=logits.device)[:, None]
            all_probs = torch.softmax(logits[[r for _, r in plain]] / temps, dim=-1).cpu()
            batched = {id(s): all_probs[i] for i, (s, _) in enumerate(plain)}
        for s, r in zip(seqs, rows):
            if s.greedy:
                continue
            # on the CPU, one multinomial per step: the same draws as generate_ids for the same seed
            probs = batched.get(id(s))
            if probs is None:
                probs = filter_probs(s.penalize(logits[r]), s.r.temperature, s.r.top_k, s.r.top_p).cpu()
            t = int(torch.multinomial(probs, 1, generator=s.gen))
            q = float(probs[t])
            top, rank = [], 0
            if s.r.logprobs:
                top_p, top_i = probs.topk(min(s.r.logprobs, self.vocab))
                top = [(int(i), math.log(v)) for v, i in zip(top_p.tolist(), top_i.tolist()) if v > 0]
                rank = 1 + int((probs > probs[t]).sum())
            picks[id(s)] = (t, q, rank, top)
        for s in seqs:
            t, q, rank, top = picks[id(s)]
            if t in s.r.stop:
                self._finish(s, "stop", stop_token=t)
                continue
            if s.matcher is not None and not s.matcher.consume_token(t):  # masked out, so never expected
                self._finish(s, "error", f"the grammar refused token {t}: {s.matcher.get_error()}")
                continue
            # the candidate entry's own value, so the picked token and its row in `top` agree exactly
            lp = next((v for i, v in top if i == t), None)
            self._emit(s.handle, Event(s.index, t, lp if lp is not None else math.log(q) if q > 0 else -math.inf,
                                       rank, top))
            s.emitted += 1
            s.out.append(t)
            s.last = t
            s.record(t)
            if s.matcher is not None and s.matcher.is_stopped():  # the grammar is complete: nothing may follow
                self._finish(s, "stop")
            elif s.emitted >= (s.r.max_tokens or s.room):
                self._finish(s, "length")

    def _shape(self, seqs: list[_Seq], logits: torch.Tensor, rows: list[int],
               masks: dict[int, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Each sample's row with its logit bias added and what its grammar forbids at -inf, in place
        (the step's logits are its own). Samples of one prompt share a prefill row but not their
        constraints: they get a copy each."""
        if len(set(rows)) < len(rows):
            logits, rows = logits[rows], list(range(len(rows)))
        for s, r in zip(seqs, rows):
            if s.r.logit_bias:
                ids = torch.tensor(list(s.r.logit_bias), device=logits.device)
                logits[r, ids] += torch.tensor(list(s.r.logit_bias.values()), device=logits.device)
        ruled = [(s, r) for s, r in zip(seqs, rows) if s.matcher is not None]
        todo = [s for s, _ in ruled if id(s) not in masks]
        if todo:  # new samples (just prefilled): not computed ahead
            masks = {**masks, **dict(zip(map(id, todo), forbidden_tokens([s.matcher for s in todo], self.vocab)))}
        for s, r in ruled:
            logits[r].masked_fill_(masks[id(s)].to(logits.device), -math.inf)
        return logits, rows

    def _finish(self, seq: _Seq, reason: str, error: str | None = None, stop_token: int | None = None) -> None:
        del self._active[seq.slot]
        self._free.append(seq.slot)
        self._free.sort()
        if reason in ("stop", "length"):  # the answer too (its slot is untouched until the next admission)
            self._keep_prefix((seq.r.prompt + seq.out)[:seq.length], seq.slot)
        self._emit(seq.handle, Event(seq.index, finish_reason=reason, prompt_tokens=len(seq.r.prompt),
                                     completion_tokens=seq.emitted, error=error, stop_token=stop_token))

    def _end(self, h: Handle, reason: str, error: str | None = None) -> None:
        """Final events for a request that never ran."""
        for i in range(h.request.n):
            self._emit(h, Event(i, finish_reason=reason, prompt_tokens=len(h.request.prompt), error=error))


def _error_line(e: Exception) -> str:
    """An exception as the one line a request's error event carries."""
    return f"{type(e).__name__}: {e}".splitlines()[0]
