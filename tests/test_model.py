"""The transformer against Hugging Face references, and its own invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.formats.hf import DictSource, config_from_hf, weights_from_hf
from lmforge.formats.modeldir import build_model
from lmforge.models.config import ModelConfig
from lmforge.models.loss import linear_cross_entropy
from lmforge.models.sizing import arch_config
from lmforge.models.transformer import Transformer

transformers = pytest.importorskip("transformers")


def from_hf_model(hf_model) -> Transformer:
    """Copy a transformers model's weights into an lmforge model (what `lmforge import` does)."""
    cfg = config_from_hf(hf_model.config.to_dict())
    source = DictSource(hf_model.state_dict())
    return build_model(cfg, dict(weights_from_hf(cfg, cfg.extra["hf_family"], source))).eval()


# Parity with transformers: the same fp32 weights through other kernels (fused qkv, our attention), so fp32
# reduction order only: ~1e-7 on these random-init logits below 1 (measured <=1.2e-7); 1e-4 holds on any CPU.
@pytest.mark.numerics
def test_gpt2_logits_match_transformers():
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0,
        attn_pdrop=0)).eval()
    ours = from_hf_model(hf)
    ids = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.numerics
def test_llama_gqa_logits_match_transformers():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0)).eval()
    ours = from_hf_model(hf)
    assert ours.cfg.n_kv_head == 2 and ours.cfg.pos_embedding == "rope"
    ids = torch.randint(0, 101, (2, 50))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_matches_full_recompute(arch):
    torch.manual_seed(0)
    model = Transformer(arch_config(arch, 97, 64, n_layer=2, n_embd=64, n_head=4)).eval()
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch=2)
        steps = [model(ids[:, :10], cache=cache)]  # prefill, then one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 30)]
    # one row at a time vs the whole sequence: other matmul shapes, fp32 order; measured <=2.7e-7 on logits ~1
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.numerics
def test_fused_loss_matches_cross_entropy_and_gradients():
    torch.manual_seed(0)
    V, N, C = 40000, 300, 16  # a large vocabulary forces several row chunks
    h = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    w = (0.1 * torch.randn(V, C, dtype=torch.float64)).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::7] = -100  # ignored positions
    ours = linear_cross_entropy(h, w, b, t)
    gh, gw, gb = torch.autograd.grad(3 * ours, (h, w, b))
    ref = F.cross_entropy(F.linear(h, w, b), t, ignore_index=-100)
    rh, rw, rb = torch.autograd.grad(3 * ref, (h, w, b))
    # float64, chunked vs whole, other reduction order: measured <=1.3e-16; 1e-10 (+ rtol 1e-5) holds for any order
    assert torch.allclose(ours, ref, atol=1e-10)
    for a, r in ((gh, rh), (gw, rw), (gb, rb)):
        assert torch.allclose(a, r, atol=1e-10)


@pytest.mark.numerics
def test_model_loss_equals_logits_loss():
    torch.manual_seed(0)
    model = Transformer(arch_config("gpt2", 50, 16, n_layer=1, n_embd=32))
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    # fp32, fused vs full logits: a mean over 32 positions of ~4, ~1e-6 (measured 0); atol 1e-5 + rtol 1e-5
    assert torch.allclose(model(x, y), F.cross_entropy(model(x).flatten(0, 1), y.flatten()), atol=1e-5)


@pytest.mark.numerics
def test_sliding_window_hides_distant_tokens():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=32, n_layer=1, n_head=2, n_embd=32, pos_embedding="rope",
                      norm="rmsnorm", mlp="gated", activation="silu", bias=False, sliding_window=4)
    model = Transformer(cfg).eval()
    a = torch.randint(0, 50, (1, 20))
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 50  # change a token far outside the last position's window
    with torch.no_grad():  # masked scores are exact zeros after softmax, the same kernels run: exact (measured 0)
        assert torch.allclose(model(a)[0, -1], model(b)[0, -1], atol=1e-6)
        assert not torch.allclose(model(a)[0, 1], model(b)[0, 1])  # ... but inside an early window


@pytest.mark.numerics
def test_right_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = Transformer(arch_config("llama", 50, 32, n_layer=2, n_embd=64, n_head=4)).eval()
    short, long = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 9))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, :5], batch[1] = short[0], long[0]
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, :5], mask[1] = 1, 1
    with torch.no_grad():
        padded = model.hidden(batch, attention_mask=mask)
        # padded batch (masked attention, other shapes) vs one sequence, fp32 order: measured <=6e-7 on values ~3
        assert torch.allclose(padded[0, :5], model.hidden(short)[0], atol=1e-5)
        assert torch.allclose(padded[1], model.hidden(long)[0], atol=1e-5)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(arch_config("gpt2", 64, 16, n_layer=8, n_embd=256))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002


@pytest.mark.numerics
@pytest.mark.parametrize("shape", [dict(pos_embedding="learned"),
                                   dict(pos_embedding="rope", n_kv_head=2, sliding_window=5, norm="rmsnorm")])
def test_rows_decode_at_their_own_positions(shape):
    """One batched decode step with each row at its own length (`KVCache.at`) gives each row the
    logits a full forward over its own sequence gives."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, context_length=32, n_layer=2, n_head=4, n_embd=32, **shape)).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (9, 3, 14)]
    cache = model.new_cache(len(seqs), 32)
    with torch.no_grad():
        for b, s in enumerate(seqs):  # prefill each row on its own, all but the last token
            view = cache.view(b, b + 1)
            model(s[None, :-1], cache=view)
        rows = torch.tensor([len(s) - 1 for s in seqs])
        last = torch.stack([s[-1] for s in seqs])[:, None]
        batched = model(last, cache=cache.at(rows, int(rows.max()) + 1))[:, -1]
        for b, s in enumerate(seqs):  # batched cached step vs full forward, fp32 order: measured 9e-8 on ~0.5
            assert torch.allclose(batched[b], model(s[None])[0, -1], atol=1e-5)
