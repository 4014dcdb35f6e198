"""GGUF files written by lmforge, run by llama.cpp itself (through llama-cpp-python): the same
logits, the same greedy tokens, the same tokenization. `make test-gguf` runs these (marker
`llamacpp`, left out of `make test`); they are skipped where llama-cpp-python is not installed."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch
from conftest import pretrained
from hf_fixtures import SAMPLE_TEXTS, gpt2_style, llama3_style, qwen_style, sentencepiece_style
from test_gguf import ARCHS, make_dir

from lmforge.cli import main
from lmforge.formats.load import load_model
from lmforge.models.config import ACTIVATIONS
from lmforge.text.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

PROMPTS = ["def ", "The module", "import os\n\nclass "]
TOKENIZE_TEXTS = SAMPLE_TEXTS + ["x = [1,2,3]\n\tif x:\n\t\treturn  None\n", "    \n\n   \t  end",
                                 "naïve résumé über 東京"]
# Logits, max abs: f32 within 1e-3 of the function llama.cpp computes (see `as_ggml_computes`), and
# within 5e-3 of lmforge's own exact-GELU GPT-2 (logits of magnitude ~10); f16 weights with
# llama.cpp's default f16 KV cache within 3e-2; q8_0: the first 16 greedy tokens.
TOL = {"f32": 1e-3, "f16": 3e-2}
EXACT_GELU_TOL = 5e-3
Q8_TOL = 0.5  # measured 0.08 (gpt2), 0.24 (llama) on logits of magnitude ~10
Q8_PROMPTS = PROMPTS + ["def main():\n    ", "The function returns", "for i in range(", "# Return the", "x = ",
                        "The class", "if not ", "return self."]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, tmp_path_factory, corpus_dir):
    """A small model of each family, trained on the synthetic corpus (so greedy picks are not ties)."""
    extra = {"arch": "llama", "n_kv_head": 1} if request.param == "llama" else {}
    return pretrained(tmp_path_factory, corpus_dir, f"gguf-{request.param}", n_embd=64, context_length=96, **extra)


def as_ggml_computes(model):
    """The model with GELU evaluated as ggml's CPU backend does: the tanh form, looked up in an f16
    table (input and output rounded to f16). SiLU models are unchanged."""
    model = copy.deepcopy(model)
    if model.cfg.activation in ("gelu", "gelu_tanh"):
        for block in model.blocks:
            block.mlp.act = lambda x: ACTIVATIONS["gelu_tanh"](x.half().float()).half().float()
    return model


def llama(path, f32_cache: bool = True):
    kw = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(str(path), n_ctx=96, logits_all=True, n_threads=1, verbose=False, **kw)


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[:len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # llama.cpp's own sampler, greedy
        out.append(t)
        if len(out) == n:
            return out
    return out


def our_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llamacpp_runs_our_file(trained, outtype, tmp_path):
    path = tmp_path / f"m.{outtype}.gguf"
    main(["export", str(trained), "--format", "gguf", "--outtype", outtype, "--out", str(path)])
    lm = load_model(trained, device="cpu")
    ggml = as_ggml_computes(lm.model)
    llm = llama(path, f32_cache=outtype == "f32")
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        theirs = llama_logits(llm, ids)
        with torch.no_grad():
            err = (theirs - ggml(torch.tensor([ids]))[0]).abs().max().item()
            err_own = (theirs - lm.model(torch.tensor([ids]))[0]).abs().max().item()
        if outtype in TOL:
            assert err <= TOL[outtype], (prompt, err)
        if outtype == "f32":
            assert err_own <= EXACT_GELU_TOL, (prompt, err_own)
        if outtype != "q8_0":
            assert llama_greedy(llm, ids, 32) == our_greedy(lm.model, ids, 32), prompt


def test_llamacpp_q8_0(trained, tmp_path):
    """q8_0: llama.cpp also rounds the activations to 8 bits inside each matmul, so its logits move
    a little further from lmforge's; greedy tokens agree until two candidates are near-tied."""
    path = tmp_path / "m.q8_0.gguf"
    main(["export", str(trained), "--format", "gguf", "--outtype", "q8_0", "--out", str(path)])
    lm = load_model(trained, device="cpu")
    deq = as_ggml_computes(load_model(path, device="cpu").model)  # the same q8_0 weights, dequantised
    llm = llama(path, f32_cache=False)
    agree, errs = [], []
    for prompt in Q8_PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        with torch.no_grad():
            errs.append((llama_logits(llm, ids) - deq(torch.tensor([ids]))[0]).abs().max().item())
        # greedy against lmforge on the same (dequantised) weights: what differs is llama.cpp's
        # 8-bit activations, which flip a near-tied pick now and then
        theirs, ours = llama_greedy(llm, ids, 32), our_greedy(deq, ids, 32)
        agree.append(next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), 32))
    print(f"q8_0 {lm.config.pos_embedding}: greedy tokens agreeing before the first difference {agree}, "
          f"max abs logit error vs the dequantised weights {max(errs):.3g}")
    assert max(errs) <= Q8_TOL
    # measured (against the fp32 model, in two environments): 8 to 10 of 11 prompts agree for all 32
    assert sum(a >= 16 for a in agree) >= 0.6 * len(agree), agree


def test_llamacpp_tokenizes_as_we_do(trained, tmp_path):
    path = tmp_path / "m.gguf"
    main(["export", str(trained), "--format", "gguf", "--out", str(path)])
    tok = load_model(trained, device="cpu").tokenizer
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TOKENIZE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, special=False), text
        assert llm.detokenize(tok.encode(text), special=True).decode() == text


@pytest.mark.parametrize("style", [gpt2_style, llama3_style, qwen_style, sentencepiece_style])
def test_llamacpp_tokenizes_hf_style_tokenizers(style, tmp_path):
    """GPT-2's split ("gpt-2"), Llama 3's with its leading BOS ("llama-bpe"), Qwen2's ("qwen2"), and
    Llama 2's SentencePiece layout (GGUF's "llama" vocabulary: scores, byte fallback)."""
    tok = Tokenizer(style())
    src = make_dir(tmp_path / "m", tok, **(ARCHS["gpt2"] if style is gpt2_style else ARCHS["llama"]))
    main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in TOKENIZE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == \
            tok.encode(text, add_special_tokens=True), text


# --- files quantised by llama.cpp itself ---------------------------------------------------------------

QTYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained_256(request, tmp_path_factory, corpus_dir):
    """256 wide, so k-quants' 256-value super-blocks fit its rows (Llama's MLP, 704 wide, gets llama.cpp's
    fallback types, as real models with odd widths do)."""
    extra = {"arch": "llama", "n_kv_head": 1} if request.param == "llama" else {}
    run = pretrained(tmp_path_factory, corpus_dir, f"gguf256-{request.param}", n_embd=256, context_length=96,
                     **extra)
    f32 = run.parent / f"{request.param}.f32.gguf"
    main(["export", str(run), "--format", "gguf", "--outtype", "f32", "--out", str(f32)])
    return run, f32


def llama_quantize(f32, qtype: str, out) -> None:
    """llama.cpp's own quantizer (what `llama-quantize model.gguf out.gguf Q4_K_M` runs)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0


def agreement(llm, model, tokenizer) -> list[int]:
    """Per prompt, how many of 32 greedy tokens agree with llama.cpp's before the first difference."""
    out = []
    for prompt in Q8_PROMPTS:
        ids = tokenizer.encode(prompt)
        theirs, ours = llama_greedy(llm, ids, 32), our_greedy(model, ids, 32)
        out.append(next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), 32))
    return out


# Max |logit error| / max |logit|, measured on both families (largest of gpt2, llama):
#  - lmforge on the file's dequantised weights (quantize="none") against llama.cpp, which also rounds
#    activations to 8 bits in quantised matmuls: 0.4% to 1.5% at every type;
#  - lmforge as loaded by default (auto) against llama.cpp: Q4_0/Q4_1/Q4_K load exactly and add only the
#    kernel's bf16 activations and scales (<= 2.0%); Q8_0/Q6_K become int8 rows, multiplied with 8-bit
#    activations (<= 2.2%); 5-bit types and Q2_K/Q3_K are requantised to int4 groups (3.6% to 11%).
DEQ_TOL = 0.03
AUTO_TOL = {"Q5_K_M": 0.15, "Q5_1": 0.15, "Q5_0": 0.15, "Q3_K_M": 0.15, "Q2_K": 0.15}


@pytest.mark.parametrize("qtype", QTYPES)
def test_llamacpp_quantised_files_load(trained_256, qtype, tmp_path):
    run, f32 = trained_256
    path = tmp_path / f"m.{qtype}.gguf"
    llama_quantize(f32, qtype, path)
    auto, deq = load_model(path, device="cpu"), load_model(path, device="cpu", quantize="none")
    llm = llama(path)
    errs = {"none": [], "auto": []}
    for prompt in Q8_PROMPTS:
        ids = auto.tokenizer.encode(prompt)
        theirs = llama_logits(llm, ids)
        with torch.no_grad():
            for mode, lm in (("none", deq), ("auto", auto)):
                ours = as_ggml_computes(lm.model)(torch.tensor([ids]))[0]
                errs[mode].append(((theirs - ours).abs().max() / theirs.abs().max()).item())
    agree = agreement(llm, as_ggml_computes(auto.model), auto.tokenizer)
    kinds = sorted({type(m).__name__ for m in auto.model.modules() if type(m).__name__.startswith("Int")})
    print(f"{auto.config.pos_embedding} {qtype}: {kinds}; logit error / max logit: dequantised "
          f"{max(errs['none']):.2%}, as loaded {max(errs['auto']):.2%}; greedy tokens agreeing {agree}")
    assert max(errs["none"]) <= DEQ_TOL, errs["none"]
    # greedy agreement is printed, not asserted per type: on a 150-step model, near ties that llama.cpp's 8-bit
    # activations flip make it noisy (6 to 11 of 11 prompts agree for 16 tokens at the 4-bit types); the logits
    # above are the check, and test_q4_k_m_from_lmforge holds greedy text to a bar
    assert max(errs["auto"]) <= AUTO_TOL.get(qtype, 0.04), errs["auto"]


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_q4_k_m_from_lmforge(trained_256, tmp_path):
    """The issue's bar: llama.cpp makes Q4_K_M from an lmforge model; lmforge loads it 4-bit, writes the
    same greedy text as llama.cpp on most prompts, in about a quarter of fp32's memory."""
    run, f32 = trained_256
    path = tmp_path / "m.Q4_K_M.gguf"
    llama_quantize(f32, "Q4_K_M", path)
    fp32, q4 = load_model(run, device="cpu"), load_model(path, device="cpu")
    llm = llama(path)
    agree = agreement(llm, as_ggml_computes(q4.model), q4.tokenizer)
    ratio = model_bytes(q4.model) / model_bytes(fp32.model)
    print(f"Q4_K_M {fp32.config.pos_embedding}: {sum(a >= 16 for a in agree)}/{len(agree)} prompts give llama.cpp's "
          f"first 16 greedy tokens, {sum(a == 32 for a in agree)} all 32 ({agree}); memory {ratio:.3f} of fp32")
    # A 150-step model has near-tied candidates that llama.cpp's 8-bit activations flip now and then; this is
    # the bar test_llamacpp_q8_0 sets for llama.cpp's own 8-bit file against lmforge's fp32 model.
    assert sum(a >= 16 for a in agree) >= 0.6 * len(agree), agree
    assert ratio <= 0.3, ratio  # int4 groups (0.16 of fp32), the Q6_K output layer as int8 rows, norms in fp32
    # quality on held-out text against the fp32 model lmforge trained
    from helpers import make_docs

    T = fp32.config.context_length
    ids = fp32.tokenizer.encode(" ".join(make_docs(60, seed=7)))
    x = torch.tensor(ids[:len(ids) // T * T]).view(-1, T)
    with torch.no_grad():
        a, b = fp32.model(x)[:, :-1], q4.model(x)[:, :-1]
    nll = [torch.nn.functional.cross_entropy(z.flatten(0, 1), x[:, 1:].flatten()) for z in (a, b)]
    ppl, top1 = (nll[1] - nll[0]).exp().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"Q4_K_M as loaded vs fp32 on {x[:, 1:].numel()} held-out positions: perplexity x{ppl:.4f}, "
          f"top-1 agreement {top1:.1%}")
    assert ppl <= 1.05 and top1 >= 0.85, (ppl, top1)  # measured x1.0000 / 98.4% (gpt2), x0.9994 / 97.8% (llama)


PEAK_SCRIPT = """
import json, os, sys
import torch
from lmforge.formats.load import load_model
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer

with torch.device("meta"):  # torch's one-time set-up for building modules (~70 MiB) before the baseline
    Transformer(ModelConfig(vocab_size=64, context_length=8, n_layer=1, n_head=1, n_embd=32))

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
lm = load_model(sys.argv[1], device="cpu")
# VmHWM, not ru_maxrss: the latter carries the parent's size across fork and exec
peak = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
size = sum(t.numel() * t.element_size() for t in [*lm.model.parameters(), *lm.model.buffers()])
print(json.dumps({"before": before, "peak": peak, "model": size}))
"""


def test_streamed_load_peak_memory(tmp_path):
    """Loading a Q4_K_M file tensor by tensor, 64 rows at a time: the process grows by at most 1.3x the
    loaded (mostly 4-bit) model plus a fixed 64 MiB; no fp32 copy of a whole matrix is ever made."""
    import json
    import subprocess
    import sys

    from hf_fixtures import gpt2_style

    tok = Tokenizer(gpt2_style())
    src = make_dir(tmp_path / "big", tok, **ARCHS["llama"], n_layer=6, n_embd=1024, n_head=16,
                   intermediate_size=2816)  # 76M parameters: 300 MB in fp32
    main(["export", str(src), "--format", "gguf", "--outtype", "f32", "--out", str(tmp_path / "big.gguf")])
    llama_quantize(tmp_path / "big.gguf", "Q4_K_M", tmp_path / "big.q4.gguf")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big.q4.gguf")], capture_output=True,
                         text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    print(f"streamed Q4_K_M load: the process grew {grew / 2**20:.0f} MiB for a {m['model'] / 2**20:.0f} MiB model "
          f"(fp32: {76e6 * 4 / 2**20:.0f} MiB); bound {1.3 * m['model'] / 2**20 + 64:.0f} MiB")
    assert grew <= 1.3 * m["model"] + 64 * 2**20


@pytest.mark.parametrize("arch", ["llama3-rope", "llama-factors"])
def test_llamacpp_rope_scaling(arch, tmp_path):
    """Llama 3.1's rope scaling travels as llama.cpp's rope_freqs tensor: the same logits at positions past the
    original context (16 here), where the scaling changes the rotation."""
    tok = Tokenizer(gpt2_style())
    src = make_dir(tmp_path / "m", tok, **ARCHS[arch])
    main(["export", str(src), "--format", "gguf", "--outtype", "f32", "--out", str(tmp_path / "m.gguf")])
    lm = load_model(src, device="cpu")
    llm = llama(tmp_path / "m.gguf")
    ids = tok.encode(" ".join(SAMPLE_TEXTS))[:60]
    assert len(ids) == 60
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0]
        plain = load_model(src, device="cpu").model
        plain.cfg.rope_scaling = None
        plain.finish_loading()  # the rotary tables without the scaling: what a reader that ignored it would get
        unscaled = plain(torch.tensor([ids]))[0]
    theirs = llama_logits(llm, ids)
    assert (theirs - ours).abs().max() <= 1e-3
    assert (theirs - unscaled).abs().max() > 100 * (theirs - ours).abs().max()  # the check can tell
