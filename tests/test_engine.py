"""The continuous-batching engine against the one-sequence reference loop (`generate_ids`)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from lmforge.core.errors import LMForgeError
from lmforge.inference.engine import Engine, Request
from lmforge.inference.generate import generate_ids
from lmforge.inference.sampling import penalize_counts
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer

SHAPES = {
    "gpt2": dict(pos_embedding="learned"),
    "llama": dict(pos_embedding="rope", norm="rmsnorm", mlp="gated", activation="silu", n_kv_head=2, bias=False),
}
PROMPTS = [[1, 2, 3], [5] * 9, [7, 8], list(range(20, 37)), [40]]


def tiny(kind: str = "llama") -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, context_length=64, n_layer=2, n_head=4, n_embd=32, **SHAPES[kind])
    return Transformer(cfg).eval()


def reference(model, prompt, n, **kw) -> list[int]:
    return [s.token for s in generate_ids(model, prompt, n, **kw)]


# Engine vs reference loop: batched decode (other matmul shapes, rows at other cache positions) vs one sequence at
# a time gives logits ~1e-7 apart (fp32 reduction order); equal tokens need the closest top-2 logits on these paths
# (~9e-4 apart for gpt2, 0.2 for llama) and the seeded draws' CDF boundaries to stay clear of that.
@pytest.mark.numerics
@pytest.mark.parametrize("kind", SHAPES)
def test_batched_greedy_equals_one_at_a_time(kind):
    model = tiny(kind)
    want = [reference(model, p, 12, temperature=0) for p in PROMPTS]
    engine = Engine(model, slots=3)  # fewer slots than requests: some wait for a free one
    handles = [engine.submit(Request(p, max_tokens=12, temperature=0)) for p in PROMPTS[:2]]
    for _ in range(3):
        engine.step()
    handles += [engine.submit(Request(p, max_tokens=12, temperature=0)) for p in PROMPTS[2:]]  # join mid-flight
    got = [h.result()[0] for h in handles]
    assert [s.tokens for s in got] == want
    assert all(s.finish_reason == "length" for s in got)
    assert engine._free == [0, 1, 2] and not engine._active


@pytest.mark.parametrize("kind", [*SHAPES, "window"])
def test_prompts_joining_together_are_fed_with_the_decode_rows_in_one_forward(kind):
    if kind == "window":  # a sliding window shorter than the prompts: each chunk's mask must apply it
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=97, context_length=64, n_layer=2, n_head=4, n_embd=32,
                                        sliding_window=5, **SHAPES["llama"])).eval()
    else:
        model = tiny(kind)
    want = [[(s.token, math.log(float(s.probs[s.token]))) for s in generate_ids(model, p, 10, temperature=0)]
            for p in PROMPTS[:4]]
    shapes = []
    hook = model.wte.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        engine = Engine(model, slots=4, prefill_chunk=20)
        first = engine.submit(Request(PROMPTS[0], max_tokens=10, temperature=0))
        engine.step()
        shapes.clear()
        joining = [engine.submit(Request(p, max_tokens=10, temperature=0)) for p in PROMPTS[1:4]]
        engine.step()  # slot 0 decodes; 9 + 2 tokens of two prompts and 9 of the third (20 in all) join it
        assert shapes == [(1, 1 + 20)]
        engine.step()  # the third prompt's last 8 tokens beside the three decode rows (slots 0-2)
        assert shapes[1] == (1, 3 + 8)
        got = [h.result()[0] for h in [first, *joining]]
    finally:
        hook.remove()
    for samples, ref in zip(got, want):
        assert samples.tokens == [t for t, _ in ref]
        assert samples.logprobs == pytest.approx([lp for _, lp in ref], abs=1e-5)


@pytest.mark.numerics
@pytest.mark.parametrize("kind", SHAPES)
def test_seeded_sample_is_the_same_alone_or_batched(kind):
    model = tiny(kind)
    settings = dict(temperature=1.0, top_k=20, top_p=0.95, seed=3)
    alone = Engine(model, slots=1).generate([Request(PROMPTS[1], max_tokens=15, **settings)])[0][0].tokens
    assert alone == reference(model, PROMPTS[1], 15, **settings)  # the same draws as the reference loop
    others = [Request(p, max_tokens=10, temperature=0.9, seed=i) for i, p in enumerate(PROMPTS)]
    batched = Engine(model, slots=4).generate([others[0], Request(PROMPTS[1], max_tokens=15, **settings), *others])
    assert batched[1][0].tokens == alone


@pytest.mark.numerics
def test_n_samples_share_one_prefill():
    model = tiny()
    prefills = []
    hook = model.wte.register_forward_pre_hook(lambda m, args: prefills.append(args[0].shape[1])
                                               if args[0].shape[1] > 2 else None)  # not the 2 decode rows
    try:
        samples = Engine(model, slots=4).generate([Request(PROMPTS[3], max_tokens=12, temperature=1.0, seed=5, n=2)])[0]
    finally:
        hook.remove()
    assert prefills == [len(PROMPTS[3])]
    assert len(samples) == 2 and samples[0].tokens != samples[1].tokens
    for i, s in enumerate(samples):  # sample i draws with seed + i
        assert s.tokens == reference(model, PROMPTS[3], 12, temperature=1.0, seed=5 + i)


def test_cancel_frees_the_slot():
    model = tiny()
    engine = Engine(model, slots=1)
    first = engine.submit(Request(PROMPTS[0], max_tokens=40, temperature=0))
    second = engine.submit(Request(PROMPTS[2], max_tokens=5, temperature=0))
    engine.step()
    engine.step()
    assert engine._free == [] and second.events.empty()  # waiting for the only slot
    first.cancel()
    events = list(first)
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens == len(events) - 1
    assert second.result()[0].tokens == reference(model, PROMPTS[2], 5, temperature=0)
    waiting = engine.submit(Request(PROMPTS[0], max_tokens=5))
    waiting.cancel()  # before it ever ran
    assert [e.finish_reason for e in waiting] == ["cancelled"]


@pytest.mark.numerics
@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0.7, top_k=5, seed=1),
                                      dict(temperature=1.3, top_p=0.9, seed=2, repetition_penalty=1.2)])
def test_logprobs_are_those_of_the_sampling_distribution(settings):
    model = tiny()
    steps = list(generate_ids(model, PROMPTS[1], 10, **settings))
    events = [e for e in Engine(model, slots=2).submit(Request(PROMPTS[1], max_tokens=10, logprobs=3, **settings))
              if e.finish_reason is None]
    assert [e.token for e in events] == [s.token for s in steps]
    for e, s in zip(events, steps):  # fp32 log-probs of magnitude <5, engine vs reference: ~1e-7 (measured 0)
        assert e.logprob == pytest.approx(math.log(float(s.probs[s.token])), abs=1e-5)
        assert e.rank == 1 + int((s.probs > s.probs[s.token]).sum())
        p, i = s.probs.topk(3)
        shown = [(int(t), math.log(float(q))) for q, t in zip(p, i) if q > 0]
        assert [t for t, _ in e.top] == [t for t, _ in shown]
        assert [lp for _, lp in e.top] == pytest.approx([lp for _, lp in shown], abs=1e-5)


def test_presence_and_frequency_penalties_adjust_logits():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    counts = torch.tensor([0, 1, 3, 0])
    out = penalize_counts(logits, counts, presence=0.5, frequency=0.25)  # dyadic values: exact in any order
    assert out.tolist() == [1.0, 2.0 - 0.5 - 0.25, 3.0 - 0.5 - 0.75, 4.0]
    assert penalize_counts(logits, counts, -1.0, 0.0).tolist() == [1.0, 3.0, 4.0, 4.0]


@pytest.mark.numerics
def test_penalties_change_greedy_output_as_specified():
    model = tiny()
    prompt, n = PROMPTS[1], 20

    def penalized_greedy(presence, frequency):  # the definition, on full forwards
        ids, counts = list(prompt), torch.zeros(97, dtype=torch.int32)
        with torch.no_grad():
            for _ in range(n):
                logits = penalize_counts(model(torch.tensor([ids]))[0, -1], counts, presence, frequency)
                ids.append(int(logits.argmax()))
                counts[ids[-1]] += 1
        return ids[len(prompt):]

    plain = reference(model, prompt, n, temperature=0)
    reqs = [Request(prompt, max_tokens=n, temperature=0, presence_penalty=2.0),
            Request(prompt, max_tokens=n, temperature=0, frequency_penalty=1.5),
            Request(PROMPTS[0], max_tokens=n, temperature=0)]
    got = [r[0].tokens for r in Engine(model, slots=3).generate(reqs)]
    assert got[0] == penalized_greedy(2.0, 0.0) and got[1] == penalized_greedy(0.0, 1.5)
    assert got[0] != plain and got[1] != plain
    assert len(set(got[0])) > len(set(plain))


def test_stop_ids_and_max_tokens_finish_reasons():
    model = tiny()
    plain = reference(model, PROMPTS[0], 10, temperature=0)
    stop = plain[3]
    cut = plain[:plain.index(stop)]
    handle = Engine(model).submit(Request(PROMPTS[0], max_tokens=10, temperature=0, stop={stop, 96}))
    events = list(handle)
    assert [e.token for e in events[:-1]] == cut
    last = events[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("stop", 3, len(cut))
    assert last.stop_token == stop  # which of the stop ids ended it
    sample = Engine(model).generate([Request(PROMPTS[0], max_tokens=10, temperature=0, stop={96, stop})])[0][0]
    assert (sample.finish_reason, sample.stop_token, sample.tokens) == ("stop", stop, cut)
    full = Engine(model).generate([Request(PROMPTS[0], max_tokens=10, temperature=0)])[0][0]
    assert full.finish_reason == "length" and full.tokens == plain and full.stop_token is None


@pytest.mark.parametrize("bad, fragment", [
    (dict(prompt=[]), "prompt is empty"), (dict(max_tokens=60), "exceeds the context length of 64"),
    (dict(temperature=-1), "--temperature"), (dict(top_p=0), "--top-p"), (dict(presence_penalty=3), "presence"),
    (dict(frequency_penalty=-2.5), "frequency"), (dict(n=5), "exceeds the engine's 4 slots"),
    (dict(prompt=[97]), "token ids"), (dict(logprobs=-1), "logprobs")])
def test_bad_requests_are_refused_in_one_line(bad, fragment):
    engine = Engine(tiny(), slots=4)
    with pytest.raises(LMForgeError, match=fragment) as e:
        engine.submit(Request(**{"prompt": PROMPTS[3], **bad}))
    assert "\n" not in str(e.value)


def test_background_thread_serves_submitters_from_other_threads():
    model = tiny("gpt2")
    want = [reference(model, p, 8, temperature=0) for p in PROMPTS]
    got: dict[int, list[int]] = {}

    def client(i):
        got[i] = [e.token for e in engine.submit(Request(PROMPTS[i], max_tokens=8, temperature=0))
                  if e.finish_reason is None]

    with Engine(model, slots=2) as engine:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert [got[i] for i in range(len(PROMPTS))] == want
    assert not engine.running


def test_failures_end_requests_with_an_error():
    model = tiny("gpt2")
    with Engine(model, slots=2) as engine:
        running = engine.submit(Request(PROMPTS[0], max_tokens=30, temperature=0))
        next(iter(running))
        hook = model.wte.register_forward_pre_hook(lambda m, args: 1 / 0 if args[0].shape[1] > 2 else None)
        try:  # a failed prefill ends only its own request
            failed = list(engine.submit(Request(PROMPTS[1], max_tokens=3)))
        finally:
            hook.remove()
        assert [e.finish_reason for e in failed] == ["error"] and "ZeroDivisionError" in failed[0].error
        assert [e.finish_reason for e in running][-1] == "length"
        hook = model.wte.register_forward_pre_hook(lambda m, args: 1 / 0 if args[0].shape[1] <= 2 else None)
        try:  # a failed decode step ends every running request
            with pytest.raises(LMForgeError, match="ZeroDivisionError"):
                engine.submit(Request(PROMPTS[1], max_tokens=3, n=2)).result()
        finally:
            hook.remove()
    assert engine._free == [0, 1]


def test_cancelling_one_of_n_samples_frees_its_slot_and_spares_the_others():
    model = tiny()
    engine = Engine(model, slots=2)
    h = engine.submit(Request(PROMPTS[3], max_tokens=12, temperature=1.0, seed=5, n=2))
    engine.step()
    h.cancel(0)
    engine.step()
    assert engine.active() == 1 and engine._free == [0]  # sample 0's slot is back at once
    events = list(h)
    ends = {e.index: e for e in events if e.finish_reason}
    assert ends[0].finish_reason == "cancelled" and ends[1].finish_reason == "length"
    assert [e.token for e in events if e.index == 1 and not e.finish_reason] == \
        reference(model, PROMPTS[3], 12, temperature=1.0, seed=6)


@pytest.mark.parametrize("kind", SHAPES)
def test_chunked_prefill_keeps_others_decoding_and_gives_the_same_tokens(kind):
    model = tiny(kind)
    long, short = list(range(1, 41)), PROMPTS[0]
    want = [reference(model, p, n, temperature=0) for p, n in ((long, 8), (short, 20))]
    engine = Engine(model, slots=3, prefill_chunk=6)
    first = engine.submit(Request(short, max_tokens=20, temperature=0))
    engine.step()  # the short prompt is in and decoding
    second = engine.submit(Request(long, max_tokens=8, temperature=0, n=2))  # 40 tokens: 7 steps of 6
    before, steps = first.events.qsize(), 0
    while engine._pending or not second.events.qsize():
        engine.step()
        steps += 1
    assert steps == 7 and first.events.qsize() == before + 7  # the short one got a token at every step meanwhile
    assert [s.tokens for s in second.result()] == [want[0], want[0]] and first.result()[0].tokens == want[1]


def test_a_request_cancelled_during_its_prefill_frees_its_slots():
    engine = Engine(tiny(), slots=2, prefill_chunk=4)
    h = engine.submit(Request(list(range(1, 30)), max_tokens=5, n=2))
    engine.step()
    assert engine._pending and engine._free == []
    h.cancel()
    engine.step()
    assert not engine._pending and engine._free == [0, 1]
    assert [e.finish_reason for e in h] == ["cancelled", "cancelled"]


def test_on_step_gets_each_steps_events_in_one_call():
    model = tiny()
    engine = Engine(model, slots=3)
    calls: list[list] = []
    engine.on_step = calls.append
    handles = [engine.submit(Request(p, max_tokens=4, temperature=0)) for p in PROMPTS[:3]]
    while engine.step():
        pass
    assert all(h.events.empty() for h in handles)  # everything went to on_step
    assert len(calls[1]) == 3 and {h for h, _ in calls[1]} == set(handles)  # one token for each, together
    for h, p in zip(handles, PROMPTS):
        assert [e.token for g, e in sum(calls, []) if g is h and e.finish_reason is None] == \
            reference(model, p, 4, temperature=0)


def test_the_engine_leaves_train_and_eval_modes_as_it_found_them():
    """A policy being trained (RL rollouts) is in train mode; generation must neither leave it in eval
    mode nor sample through its dropout."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, context_length=64, n_layer=2, n_head=4, n_embd=32, dropout=0.5,
                      **SHAPES["llama"])
    model = Transformer(cfg)
    want = reference(model.eval(), PROMPTS[3], 10, temperature=0)
    model.train()
    model.blocks[0].eval()  # a mix: each module's own mode comes back
    modes = [m.training for m in model.modules()]
    assert any(modes) and not all(modes)
    engine = Engine(model, slots=2)
    reqs = [Request(PROMPTS[3], max_tokens=10, temperature=0), Request(PROMPTS[3], max_tokens=10, temperature=0)]
    for _ in range(2):  # deterministic: dropout stays off while the engine runs
        assert [s[0].tokens for s in engine.generate(reqs)] == [want, want]
        assert [m.training for m in model.modules()] == modes
    with engine:  # the background thread too
        assert engine.submit(reqs[0]).result()[0].tokens == want
    assert [m.training for m in model.modules()] == modes


def test_temperatures_and_top_p_too_small_for_float32_sample_as_greedy():
    """5e-324 is a valid temperature or top-p, yet 0 in float32: the logits must not turn to NaNs."""
    model = tiny("gpt2")
    want = reference(model, PROMPTS[0], 6, temperature=0)
    reqs = [Request(PROMPTS[0], max_tokens=6, temperature=5e-324, seed=1),  # two plain rows: the batched path
            Request(PROMPTS[0], max_tokens=6, temperature=1e-40, seed=2),
            Request(PROMPTS[0], max_tokens=6, temperature=1.0, top_p=5e-324, seed=3)]  # filter_probs
    assert [s[0].tokens for s in Engine(model, slots=3).generate(reqs)] == [want] * 3


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_an_encoder_decoder_decodes_in_the_batch_as_alone(family, tmp_path):
    """Sources of different lengths, admitted together and mid-flight, n > 1 and greedy: each
    request's tokens equal generate_seq2seq_ids one at a time (itself equal to transformers)."""
    from hf_fixtures import tiny_seq2seq

    import lmforge
    from lmforge.inference.generate import generate_seq2seq_ids

    tiny_seq2seq(family, tmp_path)
    model = lmforge.load(tmp_path, dtype="float32").model
    sources = [list(range(3, 3 + n)) for n in (30, 7, 12, 3)]
    want = [[s.token for s in generate_seq2seq_ids(model, src, 10)] for src in sources]
    engine = Engine(model, slots=5, prefill_chunk=40)
    handles = [engine.submit(Request(src, max_tokens=10, temperature=0)) for src in sources[:2]]
    engine.step()
    engine.step()
    handles += [engine.submit(Request(sources[2], max_tokens=10, temperature=0, n=2)),
                engine.submit(Request(sources[3], max_tokens=10, temperature=0))]
    got = [[s.tokens for s in h.result()] for h in handles]
    assert got == [[want[0]], [want[1]], [want[2], want[2]], [want[3]]]
    assert engine._free == [0, 1, 2, 3, 4]
    sampled = Engine(model, slots=3).generate([Request(src, max_tokens=10, temperature=1.0, top_k=20, seed=7)
                                               for src in sources[:2]])  # seeded draws: batched as alone
    assert [s[0].tokens for s in sampled] == [[t.token for t in generate_seq2seq_ids(
        model, src, 10, temperature=1.0, top_k=20, seed=7)] for src in sources[:2]]
    one = Engine(model, slots=1)  # a longer source after a shorter one in the same slot: it reads all of its own
    assert [one.generate([Request(sources[i], max_tokens=10, temperature=0)])[0][0].tokens for i in (3, 1, 0)] == \
        [want[3], want[1], want[0]]
    too_long = [5] * (model.cfg.context_length + 1)
    with pytest.raises(LMForgeError, match=f"source is {len(too_long)} tokens"):
        engine.submit(Request(too_long, max_tokens=3))
