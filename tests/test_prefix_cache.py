"""Prefix caching: requests that start like earlier ones reuse their keys and values, and the output
is token for token what it is without the cache (partial blocks, eviction, n > 1, chunked prefill,
cancellation, a conversation's next turn)."""

from __future__ import annotations

import random

import torch

from lmforge.inference.engine import Engine, Request
from lmforge.inference.prefix_cache import PrefixCache
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer


def _model(arch: str = "gpt2") -> Transformer:
    torch.manual_seed(0)
    extra = dict(pos_embedding="rope", norm="rmsnorm", mlp="gated", n_kv_head=1) if arch == "llama" else {}
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_embd=32, n_head=2, context_length=256, **extra)
    return Transformer(cfg).eval()


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(97) for _ in range(37)]  # 2 full blocks of 16 and a part of the third
    return [shared + [rng.randrange(97) for _ in range(n)] for n in (3, 11, 30, 1)] + [shared[:20], shared]


def _run(engine: Engine, prompts, one_at_a_time: bool = True, **kw) -> list[list[list[int]]]:
    reqs = [Request(p, max_tokens=12, temperature=0, **kw) for p in prompts]
    if one_at_a_time:
        return [[s.tokens for s in engine.generate([r])[0]] for r in reqs]
    return [[s.tokens for s in samples] for samples in engine.generate(reqs)]


def test_greedy_output_is_the_same_with_the_cache():
    for arch in ("gpt2", "llama"):
        model = _model(arch)
        plain = _run(Engine(model, slots=4), _prompts())
        cache = PrefixCache(max_bytes=1 << 24, block=16)
        cached = _run(Engine(model, slots=4, prefix_cache=cache), _prompts())
        assert cached == plain
        # the next three and the last find the 32 shared tokens of full blocks, the 20-token one 16
        assert cache.stats.hit_tokens == 32 * 3 + 16 + 32 and cache.stats.lookups == 6
        assert 0 < cache.stats.hit_rate < 1


def test_next_turn_reuses_the_answer_and_eviction_keeps_output():
    model = _model()
    first = _prompts()[2]
    cache = PrefixCache(max_bytes=1 << 24, block=16)
    engine = Engine(model, slots=2, prefix_cache=cache)
    answer = engine.generate([Request(first, max_tokens=12, temperature=0)])[0][0].tokens
    turn2 = first + answer + [5, 6, 7]
    hits = cache.stats.hit_tokens
    out = engine.generate([Request(turn2, max_tokens=12, temperature=0)])[0][0].tokens
    # the cache held the prompt and the answer but its last token (never fed): all full blocks of that
    assert cache.stats.hit_tokens - hits == (len(first) + len(answer) - 1) // 16 * 16
    assert out == Engine(model, slots=1).generate([Request(turn2, max_tokens=12, temperature=0)])[0][0].tokens

    block_bytes = 2 * 2 * 2 * 16 * 16 * 4  # K and V, 2 layers, 2 heads, 16 tokens, head size 16, fp32
    small = PrefixCache(max_bytes=3 * block_bytes, block=16)
    assert _run(Engine(model, slots=4, prefix_cache=small), _prompts()) == _run(Engine(model, slots=4), _prompts())
    assert small.stats.evicted_blocks > 0 and small.bytes <= 3 * block_bytes and len(small) <= 3


def test_batched_n_samples_and_chunked_prefill_are_unchanged():
    model = _model("llama")
    for chunk in (512, 5):
        kw = dict(one_at_a_time=False, n=2, seed=3)
        plain = _run(Engine(model, slots=8, prefill_chunk=chunk), _prompts()[:3], **kw)
        cache = PrefixCache(max_bytes=1 << 24)
        engine = Engine(model, slots=8, prefill_chunk=chunk, prefix_cache=cache)
        assert _run(engine, _prompts()[:3], **kw) == plain
        assert _run(engine, _prompts()[:3], **kw) == plain  # again, now from the cache
        assert cache.stats.hit_tokens > 0


def test_sampled_output_is_the_same_with_the_cache():
    model = _model()
    reqs = lambda: [Request(p, max_tokens=10, temperature=0.9, top_p=0.95, seed=7) for p in _prompts()]  # noqa: E731
    plain = [e[0].tokens for e in Engine(model, slots=4).generate(reqs())]
    engine = Engine(model, slots=4, prefix_cache=PrefixCache(max_bytes=1 << 24))
    engine.generate(reqs())
    assert [e[0].tokens for e in engine.generate(reqs())] == plain


def test_cancelled_prefill_leaves_the_cache_sound():
    model = _model()
    cache = PrefixCache(max_bytes=1 << 24)
    engine = Engine(model, slots=2, prefill_chunk=4, prefix_cache=cache)
    long = _prompts()[2]
    h = engine.submit(Request(long, max_tokens=5, temperature=0))
    engine.step()
    engine.step()
    h.cancel()
    assert [s.finish_reason for s in h.result()] == ["cancelled"]
    assert len(cache) == 0  # nothing half-computed was kept
    assert _run(engine, [long]) == _run(Engine(model, slots=1), [long])


def test_a_prompt_fed_in_chunks_keeps_its_first_entries_while_others_decode():
    """Regression: a decode step used to write its dummy rows at position 0 of every slot below the
    highest active one, including a slot whose prompt was half fed."""
    model = _model()
    engine = Engine(model, slots=4, prefill_chunk=4)
    engine.submit(Request([1, 2, 3], max_tokens=3, temperature=0))
    b = engine.submit(Request([4, 5], max_tokens=40, temperature=0))
    d = engine.submit(Request([6], max_tokens=40, temperature=0))
    for _ in range(10):
        engine.step()
        if engine._free == [0, 3]:
            break
    assert engine._free == [0, 3]  # the first has finished: slot 0 is free while two decode in slots 1 and 2
    long = _prompts()[2]
    c = engine.submit(Request(long, max_tokens=40, temperature=0))
    while 0 not in engine._active:  # its prompt goes in 4 tokens a step, beside the two decoding
        engine.step()
    ref = model.new_cache(1, 256)
    with torch.no_grad():
        model(torch.tensor([long]), cache=ref)
    for got, want in zip(engine.cache.k + engine.cache.v, ref.k + ref.v):
        torch.testing.assert_close(got[0, :, :len(long)], want[0, :, :len(long)], atol=1e-5, rtol=0)
    c.cancel(), b.cancel(), d.cancel()
    engine.close()


def test_a_prefix_longer_than_the_cache_keeps_its_first_blocks():
    """Storing never evicts the blocks of the prefix being stored, so every kept block stays reachable."""
    model = _model()
    block_bytes = 2 * 2 * 2 * 16 * 16 * 4
    cache = PrefixCache(max_bytes=4 * block_bytes, block=16)
    engine = Engine(model, slots=2, prefix_cache=cache)
    rng = random.Random(1)
    other = [rng.randrange(97) for _ in range(33)]
    long = [rng.randrange(97) for _ in range(90)]  # five full blocks and a part
    engine.generate([Request(other, max_tokens=1, temperature=0)])
    engine.generate([Request(long, max_tokens=1, temperature=0)])
    assert len(cache) == 4 and cache.bytes == 4 * block_bytes
    hits = cache.stats.hit_tokens
    engine.generate([Request(long + [1], max_tokens=1, temperature=0)])
    assert cache.stats.hit_tokens - hits == 64  # its first four blocks, all reachable


def test_a_local_generator_reuses_what_it_computed_before(tiny_run):
    """Agents and RAG through --model resend a growing transcript: the second call starts from the cache."""
    from lmforge.formats.load import load_model
    from lmforge.inference.client import LocalGenerator

    text = "Return the list of items, and"
    gen, fresh = LocalGenerator(load_model(tiny_run)), LocalGenerator(load_model(tiny_run))
    first = gen.complete(text, max_tokens=4)
    second = gen.complete(text + first + " then", max_tokens=4)
    assert gen._prefix.stats.hit_tokens >= 16 and gen._prefix.stats.lookups == 2
    assert second == fresh.complete(text + first + " then", max_tokens=4)
