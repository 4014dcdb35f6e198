"""Architecture options for small models: QK-norm, a ReLU^2 MLP, an untied zero-initialised head,
logit soft-capping; each trains, round-trips through the model directory, and exports to Hugging
Face exactly where a family can express it (a one-line refusal where none can)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_clean_error, run_cli

from lmforge import load
from lmforge.core.errors import LMForgeError
from lmforge.formats.hf import export_family
from lmforge.models.config import ModelConfig
from lmforge.models.loss import linear_cross_entropy
from lmforge.models.transformer import Transformer
from lmforge.training.pretrain import PretrainConfig, model_options, pretrain

CFG = dict(vocab_size=96, context_length=16, n_layer=2, n_head=2, n_embd=32)


def test_relu2_is_squared_relu_and_keeps_the_plain_mlp_width():
    opts = model_options(PretrainConfig(arch="llama", relu2=True))
    cfg = ModelConfig(**CFG, **opts)
    assert (cfg.mlp, cfg.activation, cfg.intermediate_size) == ("plain", "relu2", 4 * 32)
    x = torch.randn(50)
    model = Transformer(cfg)
    assert torch.equal(model.blocks[0].mlp.act(x), torch.relu(x) ** 2)  # x ** 2 and .square() are one multiply: exact


@pytest.mark.numerics
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 16))
    for qk_norm, same in ((True, True), (False, False)):
        model = Transformer(ModelConfig(**CFG, qk_norm=qk_norm)).eval()
        before = model(ids)
        with torch.no_grad():  # scale the query and key rows of the first block's fused projection
            model.blocks[0].attn.qkv.weight[:64] *= 5.0
            model.blocks[0].attn.qkv.bias[:64] *= 5.0
        # with QK-norm the logits move only through the norm's eps (measured 3e-5; 1e-7 with eps 1e-12), without
        # it by ~1e-2: the bound sits between, far above fp32 rounding (~1e-7 on logits below 1)
        assert torch.allclose(model(ids), before, atol=1e-4) == same


@pytest.mark.numerics
def test_untied_head_starts_at_zero_and_predicts_uniformly():
    model = Transformer(ModelConfig(**CFG, tie_embeddings=False, zero_init=True))
    assert model.lm_head.weight is not model.wte.weight
    zero = [n for n, p in model.named_parameters() if p.dim() == 2 and not p.abs().sum()]
    assert set(zero) == {"lm_head.weight"} | {f"blocks.{i}.{m}.proj.weight" for i in range(2) for m in ("attn", "mlp")}
    ids = torch.randint(0, 96, (2, 16))
    # zero logits: fp32 log(96) (a vectorised log, ~1 ulp = 5e-7) averaged over 30 positions (summation rounding,
    # up to ~30 x 6e-8 relative): was abs 1e-6, about 2 ulps; a head at the usual 0.02 init moves it by ~1e-2
    assert model(ids[:, :-1], ids[:, 1:]).item() == pytest.approx(math.log(96), abs=1e-5)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)  # the embedding keeps its init


@pytest.mark.numerics
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_capped_fused_loss_matches_plain_cross_entropy_of_capped_logits(reduction):
    torch.manual_seed(0)
    h = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = (3 * torch.randn(50, 16, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 50, (300,))
    y[::7] = -100
    cap = 5.0
    ours = linear_cross_entropy(h, w, None, y, reduction=reduction, softcap=cap)
    logits = cap * torch.tanh(F.linear(h, w) / cap)
    ref = F.cross_entropy(logits, y, reduction=reduction)
    # float64, chunked fused loss vs the plain formula (other reduction order, tanh/exp/log kernels): measured
    # <=4e-15; atol 1e-10 plus allclose's rtol 1e-5 holds for any order
    assert torch.allclose(ours, ref, atol=1e-10)
    upstream = torch.rand_like(ours)
    g_ours = torch.autograd.grad((ours * upstream).sum(), (h, w))
    g_ref = torch.autograd.grad((ref * upstream).sum(), (h, w))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_ours, g_ref))
    assert F.linear(h, w).abs().max() > 2 * cap  # the cap bites


def test_soft_capped_logits_stay_within_the_cap():
    model = Transformer(ModelConfig(**CFG, logit_softcap=2.0))
    with torch.no_grad():
        model.wte.weight.mul_(200)
    ids = torch.randint(0, 96, (2, 16))
    logits = model(ids)
    raw = model.lm_head(model.hidden(ids))
    assert raw.abs().max() > 10 and logits.abs().max() <= 2.0
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0))  # the model's own ops on the same shapes: exact


def test_export_refuses_what_hugging_face_cannot_express():
    gpt2 = dict(CFG, norm="layernorm", mlp="plain", pos_embedding="learned")
    assert export_family(ModelConfig(**gpt2, activation="relu2", tie_embeddings=False, zero_init=True)) == "gpt2"
    llama = dict(CFG, norm="rmsnorm", mlp="gated", pos_embedding="rope", bias=False, activation="silu")
    assert export_family(ModelConfig(**llama, qk_norm=True)) == "qwen3"
    with pytest.raises(LMForgeError, match="QK-norm has no equivalent"):
        export_family(ModelConfig(**gpt2, qk_norm=True))
    with pytest.raises(LMForgeError, match="soft-capping"):
        export_family(ModelConfig(**llama, logit_softcap=15.0))
    with pytest.raises(LMForgeError, match="no Hugging Face equivalent"):  # llama with a plain MLP
        export_family(ModelConfig(**{**llama, "mlp": "plain", "activation": "relu2"}))


def test_pretrain_with_every_option_then_export(corpus_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    common = dict(data=[str(corpus_dir)], n_layer=2, n_embd=32, n_head=2, context_length=16, batch_size=4,
                  max_steps=6, eval_every=100, eval_batches=1, vocab_size=300, lr=3e-3, device="cpu", seed=1)
    run = tmp_path / "run"
    pretrain(PretrainConfig(**common, out=str(run), qk_norm=True, relu2=True, untied_head=True, logit_softcap=15.0))
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["qk_norm"], saved["activation"], saved["tie_embeddings"], saved["zero_init"],
            saved["logit_softcap"]) == (True, "relu2", False, True, 15.0)
    lm = load(run, device="cpu")
    assert lm.model.lm_head.weight.abs().sum() > 0  # trained away from zero
    assert_clean_error(run_cli("export", str(run), "--out", str(tmp_path / "hf")), "soft-capping")
    # without the cap and QK-norm, gpt2 expresses ReLU^2 and an untied head: logits match transformers
    plain = tmp_path / "plain"
    pretrain(PretrainConfig(**common, out=str(plain), relu2=True, untied_head=True))
    proc = run_cli("export", str(plain), "--out", str(tmp_path / "hf2"))
    assert proc.returncode == 0, proc.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert hf.config.activation_function == "relu2" and not hf.config.tie_word_embeddings
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():  # same weights, transformers' kernels vs ours (fp32 reduction order): ~1e-6, measured 0
        assert (hf(ids).logits - load(plain, device="cpu").model(ids)).abs().max().item() <= 1e-4
