"""Encoder-decoders (T5, FLAN-T5, BART) in the one Transformer: imported tiny random checkpoints give
transformers' logits, loss and greedy tokens (through the KV cache), export round-trips, the
cache's per-row cross-attention keys and values serve batched decoding, and old configs load."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import tiny_seq2seq

import lmforge
from lmforge.cli import main
from lmforge.core.errors import LMForgeError
from lmforge.inference.generate import generate_seq2seq_ids
from lmforge.models.config import ModelConfig
from lmforge.models.relpos import relative_position_bucket
from lmforge.models.transformer import Transformer

VARIANTS = {"t5": ("t5", {}), "flan-t5": ("t5", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
            "bart": ("bart", {}), "bart-scaled": ("bart", dict(scale_embedding=True))}
SOURCE = "The quick brown fox jumps over the lazy dog, twice."


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, vocab, (2, 30), generator=g)
    mask = torch.ones_like(src)
    mask[1, 19:] = 0  # the second source is padded
    dec = torch.randint(3, vocab, (2, 25), generator=g)
    labels = dec.clone()
    labels[0, -4:] = -100
    return src, mask, dec, labels


def _compare(hf, model, atol=1e-4):
    src, mask, dec, labels = _batch(200)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=dec, labels=labels)
        got = model(src, attention_mask=mask, decoder_input_ids=dec)
        loss = model(src, labels, attention_mask=mask, decoder_input_ids=dec)
    torch.testing.assert_close(got, ref.logits, atol=atol, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=atol, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_loss_and_greedy_tokens_match_transformers(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    hf = tiny_seq2seq(family, tmp_path, **overrides)
    lm = lmforge.load(tmp_path, dtype="float32")
    assert lm.kind.value == "seq2seq" and lm.config.is_encoder_decoder
    assert lm.config.tie_embeddings == (variant != "flan-t5")
    _compare(hf, lm.model)
    with torch.no_grad():  # labels alone: the decoder reads them shifted right after the start token
        src, mask, _, labels = _batch(200)
        ref = hf(input_ids=src, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(lm.model(src, labels, attention_mask=mask), ref, atol=1e-4, rtol=0)

    src = lm.tokenizer.encode(SOURCE, add_special_tokens=True)
    ours = [step.token for step in generate_seq2seq_ids(lm.model, src, 32)]
    # transformers' T5 cache breaks with fewer encoder than decoder layers: its reference recomputes
    ref = hf.generate(torch.tensor([src]), max_new_tokens=32, do_sample=False, eos_token_id=None, use_cache=False)
    assert ours == ref[0, 1:].tolist()
    assert len(ours) == 32 and len(set(ours)) > 1  # not one token repeated


def test_cached_decoding_equals_recomputing(tmp_path):
    tiny_seq2seq("t5", tmp_path)
    model = lmforge.load(tmp_path, dtype="float32").model
    src, _, dec, _ = _batch(200)
    with torch.no_grad():
        full = model.head(model.decode(dec[:1], model.encode(src[:1])))
        cache = model.new_cache(1, 25, max_src_len=30)
        memory = model.encode(src[:1])
        steps = [model.head(model.decode(dec[:1, :10], memory, cache=cache))]  # a chunk, then token by token
        steps += [model.head(model.decode(dec[:1, t:t + 1], cache=cache)) for t in range(10, 25)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_slots_hold_cross_attention_row_by_row(family, tmp_path):
    """Two requests of different source lengths written into their own cache rows, then decoded
    together at different positions (`cache.at`), give each one's solo logits."""
    tiny_seq2seq(family, tmp_path)
    model = lmforge.load(tmp_path, dtype="float32").model
    src, _, dec, _ = _batch(200)
    lens, steps = [30, 12], [6, 3]
    with torch.no_grad():
        solo = [model.head(model.decode(dec[b:b + 1, :steps[b] + 1], model.encode(src[b:b + 1, :lens[b]])))[0, -1]
                for b in range(2)]
        cache = model.new_cache(2, 25, max_src_len=40)
        for b in (1, 0):  # row by row, in any order
            model.remember(cache, model.encode(src[b:b + 1, :lens[b]]), rows=torch.tensor([b]))
            for t in range(steps[b]):  # each row's prefix, one token at a time at its own positions
                rows = torch.tensor([t if r == b else 0 for r in range(2)])
                model.decode(dec[:, t:t + 1], cache=cache.at(rows, t + 1))
        rows = torch.tensor(steps)
        both = model.head(model.decode(dec[torch.arange(2), rows][:, None], cache=cache.at(rows, int(rows.max()) + 1)))
    assert cache.cross_mask.sum(1).tolist() == lens
    for b in range(2):
        torch.testing.assert_close(both[b, -1], solo[b], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_export_round_trip(variant, tmp_path):
    import transformers as tf

    family, overrides = VARIANTS[variant]
    hf = tiny_seq2seq(family, tmp_path / "hf", **overrides)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["kind"] == "seq2seq" and meta["model"]["n_decoder_layer"] == 3
    _compare(hf, lmforge.load(tmp_path / "run").model)
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    again = tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    _compare(again, lmforge.load(tmp_path / "run").model)
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok(SOURCE).input_ids == lmforge.load(tmp_path / "out").tokenizer.encode(SOURCE, add_special_tokens=True)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), ref)


def test_configs_load_unchanged_and_new_fields_round_trip():
    old = {"vocab_size": 300, "context_length": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
    cfg = ModelConfig.from_dict(old)
    assert not cfg.is_encoder_decoder and cfg.attn_scale is None and cfg.head_scale == 1.0
    assert sorted(Transformer(cfg).state_dict()) == sorted(Transformer(ModelConfig(**old)).state_dict())
    t5 = ModelConfig(**old, n_decoder_layer=1, pos_embedding="relative", attn_scale=1.0, decoder_start_token_id=0)
    assert ModelConfig.from_dict(t5.to_dict()) == t5
    names = Transformer(t5).state_dict()
    assert "rel_bias.weight" in names and "decoder.blocks.0.cross_attn.kv.weight" in names
    with pytest.raises(LMForgeError, match="relative positions"):
        ModelConfig(**old, pos_embedding="relative")
    with pytest.raises(LMForgeError, match="not an encoder-decoder"):
        Transformer(cfg).encode(torch.zeros(1, 3, dtype=torch.long))


def test_trains_from_scratch_through_the_loss_path():
    """A fresh encoder-decoder learns to copy: the fused loss path's gradients reach every stack."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, context_length=16, n_layer=1, n_decoder_layer=1, n_head=2, n_embd=32,
                      pos_embedding="relative", norm="rmsnorm", bias=False, decoder_start_token_id=0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    src = torch.randint(1, 16, (32, 6))
    for _ in range(150):
        loss = model(src, src)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    out = [s.token for s in generate_seq2seq_ids(model, src[0].tolist(), 6)]
    assert out == src[0].tolist()


def test_a_tied_t5_without_the_output_scale_exports_its_output_layer(tmp_path):
    """transformers ties T5's output layer only with the d_model^-0.5 scale: a tied, unscaled
    lmforge model must go out untied, with its output layer written, or transformers would load a
    random one."""
    import transformers as tf

    tiny_seq2seq("t5", tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    config = tmp_path / "run" / "config.json"
    meta = json.loads(config.read_text())
    assert meta["model"]["tie_embeddings"]
    meta["model"]["head_scale"] = 1.0
    config.write_text(json.dumps(meta))
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:  # what any reader (transformers 4 too) needs
        assert "lm_head.weight" in f.keys()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    _compare(tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval(), lmforge.load(tmp_path / "run").model)
