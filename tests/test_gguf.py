"""GGUF export and import without llama.cpp: round trips, tokenizer rebuilding, bad input.
(llama.cpp itself checks the files in test_gguf_llamacpp.py, `make test-gguf`.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import fails, make_docs
from hf_fixtures import SAMPLE_TEXTS, gpt2_style, llama3_style, qwen_style, sentencepiece_style, wordpiece_style

from lmforge.cli import main
from lmforge.formats.gguf_load import load_gguf
from lmforge.formats.load import load_model
from lmforge.formats.modeldir import save_model_dir
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.text.tokenizer import Tokenizer

LLAMA = dict(norm="rmsnorm", mlp="gated", activation="silu", pos_embedding="rope", bias=False)
ARCHS = {
    "gpt2": {"activation": "gelu"},  # lmforge's own GPT-2 (exact GELU; llama.cpp's is the tanh form)
    "gpt2-tanh": {},  # Hugging Face's GPT-2
    "llama": dict(LLAMA, n_kv_head=2, tie_embeddings=False),  # grouped-query attention, separate output layer
    "qwen2": dict(LLAMA, n_kv_head=2, qkv_bias=True, rope_theta=1e6),
    "qwen3": dict(LLAMA, n_kv_head=2, qk_norm=True, head_dim=32),  # head_dim independent of the width
    # Llama 3.1's rope scaling (here from a 16-token original context), and the per-frequency divisors a GGUF
    # file from elsewhere carries it as (tensor rope_freqs)
    "llama3-rope": dict(LLAMA, n_kv_head=2, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16}),
    "llama-factors": dict(LLAMA, rope_scaling={"type": "factors", "factors": [1.0, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 8.0]}),
}


def make_dir(path: Path, tokenizer: Tokenizer | None = None, seed: int = 0, **kw) -> Path:
    """A random tiny model directory (vocabulary padded past the tokenizer, as real models do)."""
    tokenizer = tokenizer or Tokenizer.train(make_docs(40), 300, show_progress=False)
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=tokenizer.vocab_size + 8, context_length=64, n_layer=2, n_head=4,
                                n_embd=64), **kw})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a misplaced tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save_model_dir(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_docs(60), 320, show_progress=False)


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_logits(arch, tok, tmp_path, capsys):
    src = make_dir(tmp_path / "m", tok, **ARCHS[arch])
    ref = load_model(src, device="cpu")
    ids = torch.tensor([tok.encode("def f(x):\n    return x + 1  # <|endoftext|> naïve")])
    with torch.no_grad():
        want = ref.model(ids)
        # f32: bit-identical weights, the same layout and kernels: exact. f16 / q8_0: the weights' rounding (measured
        # <=3e-4 / <=7e-3), not computation order, which adds only ~1e-7
        for outtype, tol in (("f32", 0.0), ("f16", 2e-3), ("q8_0", 3e-2)):
            out = str(tmp_path / f"{outtype}.gguf")
            main(["export", str(src), "--format", "gguf", "--outtype", outtype, "--out", out])
            back = load_model(tmp_path / f"{outtype}.gguf", device="cpu")  # lmforge.load("model.gguf")
            assert back.model.cfg.to_dict() == {**ref.model.cfg.to_dict(), "extra": {}}
            err = (back.model(ids) - want).abs().max().item()
            assert err <= tol, (outtype, err)
    assert f"GGUF ({arch.split('-')[0].replace('llama3', 'llama')}, q8_0)" in capsys.readouterr().err


def test_import_writes_a_model_directory(tok, tmp_path):
    src = make_dir(tmp_path / "m", tok, **ARCHS["llama"])
    main(["export", str(src), "--format", "gguf", "--outtype", "f32", "--out", str(tmp_path / "m.gguf")])
    main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")])
    a, b = load_model(src, device="cpu"), load_model(tmp_path / "back", device="cpu")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["created_by"] == "lmforge import (gguf llama)"
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), name
    for text in SAMPLE_TEXTS:
        assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
        assert b.tokenizer.decode(b.tokenizer.encode(text)) == text
    assert b.tokenizer.eot_id == a.tokenizer.eot_id and b.stop_ids() == a.stop_ids()


@pytest.mark.parametrize("style", [gpt2_style, llama3_style, qwen_style, sentencepiece_style])
def test_tokenizers_rebuilt_exactly(style, tmp_path):
    """Hugging Face-style tokenizers (GPT-2's split; Llama 3's with a leading BOS; Qwen2's; Llama 2's
    SentencePiece layout with byte fallback) come back from GGUF's token list and merges (or scores)
    as the same tokenizer."""
    tok = Tokenizer(style())
    src = make_dir(tmp_path / "m", tok, **(ARCHS["gpt2"] if style is gpt2_style else ARCHS["llama"]))
    main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    _, back, _ = load_gguf(tmp_path / "m.gguf")
    for text in SAMPLE_TEXTS + ["naïve résumé über 東京 🙂", "  two  spaces\n\ttab"]:
        for special in (True, False):
            assert back.encode(text, special) == tok.encode(text, special), (text, special)
        assert back.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
        assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    fields = {k: v.contents() for k, v in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    if style is sentencepiece_style:
        assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"]
        assert fields["tokenizer.ggml.token_type"][tok.hf.token_to_id("<0x41>")] == 6  # BYTE
    else:
        pre = {gpt2_style: "gpt-2", llama3_style: "llama-bpe", qwen_style: "qwen2"}[style]
        assert fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.add_bos_token"] == (style in (llama3_style, sentencepiece_style))
    assert fields["tokenizer.ggml.tokens"][-1].startswith("[PAD")  # padded to the embedding rows


def test_chat_template_travels(tok, tmp_path):
    src = make_dir(tmp_path / "m", tok)
    meta = json.loads((src / "config.json").read_text())
    meta.update(chat_template={"name": "chatml"}, stop_token_ids=[tok.token_id("<|im_end|>")])
    (src / "config.json").write_text(json.dumps(meta))
    main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    back = load_model(tmp_path / "m.gguf", device="cpu")
    from lmforge.text.templates import get_template

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ours = get_template("chatml", tok).render(msgs, tok)
    theirs = get_template("auto", back.tokenizer).render(msgs, back.tokenizer)
    assert "".join(t for t, _, _ in ours) == "".join(t for t, _, _ in theirs)
    assert tok.token_id("<|im_end|>") in back.stop_ids()


# --- bad input -------------------------------------------------------------------------------------

def test_refusals(tok, tmp_path, capsys):
    src = make_dir(tmp_path / "m", tok)
    out = tmp_path / "x.gguf"
    enc = make_dir(tmp_path / "enc", tok, causal=False, norm_position="post", embedding_norm=True)
    meta = json.loads((enc / "config.json").read_text())
    (enc / "config.json").write_text(json.dumps({**meta, "kind": "encoder"}))
    fails(capsys, "needs a decoder (causal language model); " + str(enc) + " is an encoder", "export", str(enc),
          "--format", "gguf", "--out", str(out))
    adapter = tmp_path / "adapter"
    shutil.copytree(src, adapter)
    meta = json.loads((adapter / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps({**meta, "lora": {"rank": 4}}))
    fails(capsys, "merge it first", "export", str(adapter), "--format", "gguf", "--out", str(out))
    odd = make_dir(tmp_path / "odd", tok, activation="relu")
    fails(capsys, "gpt2 architecture needs GELU", "export", str(odd), "--format", "gguf", "--out", str(out))
    wordpiece = make_dir(tmp_path / "wp", Tokenizer(wordpiece_style()))
    fails(capsys, "WordPiece tokenizer of neither layout", "export", str(wordpiece), "--format", "gguf", "--out",
          str(out))
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))  # nothing half-written
    main(["export", str(src), "--format", "gguf", "--out", str(out)])
    fails(capsys, "exists", "export", str(src), "--format", "gguf", "--out", str(out))


def test_bad_files(tok, tmp_path, capsys):
    src = make_dir(tmp_path / "m", tok)
    good = tmp_path / "m.gguf"
    main(["export", str(src), "--format", "gguf", "--out", str(good)])
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    for frac in (0.1, 0.5, 0.999):  # inside the header, the tensor table, the last tensor
        cut.write_bytes(data[:int(len(data) * frac)])
        err = fails(capsys, "not a valid GGUF file", "import", str(cut), "--out", str(tmp_path / "o1"))
        assert "cut short" in err and "reshape" not in err and "dtype" not in err, err  # no numpy internals
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    fails(capsys, "not a valid GGUF file", "import", str(junk), "--out", str(tmp_path / "o2"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

    def write(path: Path, arch: str, qtype) -> Path:
        w = gguf.GGUFWriter(str(path), arch)
        data = np.zeros(gguf.quant_shape_to_byte_shape((8, 64), qtype), np.uint8) if qtype.name.startswith("IQ") \
            else gguf.quants.quantize(np.ones((8, 64), np.float32), qtype)
        w.add_tensor("token_embd.weight", data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    fails(capsys, "unsupported GGUF architecture 'falcon'", "import",
          str(write(tmp_path / "f.gguf", "falcon", gguf.GGMLQuantizationType.F32)), "--out", str(tmp_path / "o3"))
    iq4 = write(tmp_path / "iq4.gguf", "llama", gguf.GGMLQuantizationType.IQ4_NL)
    fails(capsys, "quantisation type IQ4_NL, which lmforge cannot read", "import", str(iq4), "--out",
          str(tmp_path / "o4"))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16"])
def test_quantised_files_load_at_their_precision(qtype, tok, tmp_path):
    """quantize="auto" keeps a file's own precision (4- and 5-bit -> int4, 8-bit -> int8, bf16 -> fp32);
    Q4_0/Q4_1 load as exactly the file's 4-bit values (the quantised files are written by the gguf
    package, as `export --outtype q4_0` does; llama.cpp's own k-quants are in test_gguf_llamacpp.py)."""
    from lmforge.formats.gguf import write_gguf
    from lmforge.models.quant import Int4Linear, Int8Embedding, Int8Linear

    src = make_dir(tmp_path / "m", tok, **ARCHS["llama"])
    lm = load_model(src, device="cpu", quantize="none")
    path = tmp_path / f"m.{qtype}.gguf"
    write_gguf(lm.model, lm.tokenizer, lm.meta, path, qtype)
    auto, plain = load_model(path, device="cpu"), load_model(path, device="cpu", quantize="none")
    want = {"q8_0": Int8Linear, "bf16": torch.nn.Linear}.get(qtype, Int4Linear)
    assert isinstance(auto.model.blocks[0].attn.qkv, want) and isinstance(auto.model.blocks[1].mlp.proj, want)
    assert isinstance(auto.model.wte, Int8Embedding if qtype != "bf16" else torch.nn.Embedding)
    assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in plain.model.modules())
    if qtype in ("q4_0", "q4_1"):  # the same 4-bit values: only the kernel's bf16 scales round (2^-9 relative)
        for name, m in auto.model.named_modules():
            if isinstance(m, Int4Linear):
                w = plain.model.get_submodule(name).weight
                assert (m.effective_weight() - w).abs().max() <= w.abs().max() * 2 ** -7, name
    ids = torch.tensor([tok.encode("def f(x):\n    return x + 1  # naïve")])
    with torch.no_grad():
        a, b = auto.model(ids), plain.model(ids)
    # bf16 activations in the quantised kernels (and, for 5-bit types, requantising to 4 bits)
    tol = {"q5_0": 0.15, "q5_1": 0.15, "bf16": 1e-5}.get(qtype, 0.05)
    assert (a - b).abs().max() <= tol * b.abs().max(), (qtype, (a - b).abs().max().item())
    assert isinstance(load_model(path, device="cpu", quantize="int4").model.lm_head, Int4Linear)
    assert isinstance(load_model(path, device="cpu", quantize="int8").model.blocks[0].attn.qkv, Int8Linear)


def test_outtype_q4_0_and_quantised_bad_input(tok, tmp_path, capsys, monkeypatch):
    from lmforge.formats import gguf_load

    src = make_dir(tmp_path / "m", tok, **ARCHS["qwen2"])
    out = tmp_path / "m.gguf"
    main(["export", str(src), "--format", "gguf", "--outtype", "q4_0", "--out", str(out)])
    f, infos = gguf_load._read(out)
    assert infos["blk.0.attn_q.weight"].tensor_type.name == "Q4_0"
    assert infos["token_embd.weight"].tensor_type.name == "Q8_0"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    # more than the memory left: refused before anything is built
    monkeypatch.setattr(gguf_load, "available_memory", lambda: 1000)
    fails(capsys, "GiB of memory as loaded (none), and 0.0 GiB is available; try --quantize int4", "import",
          str(out), "--out", str(tmp_path / "o"))
    fails(capsys, "as loaded (auto)", "generate", str(out), "-p", "x")
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    # a tensor whose shape disagrees with the metadata
    reader = gguf.GGUFReader(out)

    def rewrite(path: Path, ffn_extra: int = 0, drop: str = "") -> Path:
        w = gguf.GGUFWriter(str(path), "qwen2")
        for key, fld in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            value = fld.contents()
            if key == "qwen2.feed_forward_length":
                value += ffn_extra
            w.add_key_value(key, value, fld.types[0], sub_type=fld.types[-1] if len(fld.types) > 1 else None)
        for t in reader.tensors:
            if t.name != drop:
                w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    fails(capsys, "disagrees with the file's metadata", "generate", str(rewrite(tmp_path / "b1.gguf", 32)), "-p", "x")
    fails(capsys, "lacks tensor blk.1.ffn_down.weight", "generate",
          str(rewrite(tmp_path / "b2.gguf", drop="blk.1.ffn_down.weight")), "-p", "x")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "qwen3", "llama3-rope"])
def test_q4_0_files_of_every_architecture(arch, tok, tmp_path):
    """Fused and reordered rows (gpt2's qkv, llama's q/k pair order, qwen's biases and q/k norms) keep their
    4-bit values: int4 as loaded against the same file dequantised."""
    src = make_dir(tmp_path / "m", tok, **ARCHS[arch])
    main(["export", str(src), "--format", "gguf", "--outtype", "q4_0", "--out", str(tmp_path / "m.gguf")])
    auto, plain = load_model(tmp_path / "m.gguf", device="cpu"), load_model(tmp_path / "m.gguf", device="cpu",
                                                                             quantize="none")
    ids = torch.tensor([tok.encode("def f(x):\n    return x + 1  # naïve")])
    with torch.no_grad():
        a, b = auto.model(ids), plain.model(ids)
    assert (a - b).abs().max() <= 0.05 * b.abs().max(), (a - b).abs().max().item()
