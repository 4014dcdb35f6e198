"""Hugging Face checkpoints in and out, against `transformers` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_clean_error, run_cli
from hf_fixtures import SAMPLE_TEXTS, gpt2_style, llama3_style, qwen_style, sentencepiece_style, tiny_hf_model

from lmforge import load
from lmforge.inference.generate import generate_ids
from lmforge.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"hf_{request.param}")
    return request.param, directory, tiny_hf_model(request.param, directory)


def ids_for(vocab: int, n: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


# Logits of these random-init models are below 1; transformers' kernels vs ours on the same fp32 weights differ by
# fp32 reduction order, ~1e-7 (measured <=2.4e-7): 1e-4 is ample on any CPU. The same transformers model on
# re-exported, bit-identical weights is exact (measured 0; 1e-5 to spare).
@pytest.mark.numerics
def test_imported_logits_match(ckpt):
    family, directory, hf = ckpt
    lm = load(directory, device="cpu")
    ids = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        assert (lm.model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.numerics
def test_greedy_generation_matches_transformers(ckpt):
    """Equal tokens from logits ~1e-7 apart: the closest top-2 logits on these paths are >=4e-4 apart."""
    family, directory, hf = ckpt
    lm = load(directory, device="cpu")
    prompt = lm.tokenizer.encode("The given value returns", add_special_tokens=True)
    hf.generation_config.eos_token_id = None  # generate all 32 tokens on both sides
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    ours = [s.token for s in generate_ids(lm.model, prompt, 32, temperature=0)]
    assert ours == theirs
    assert [s.token for s in generate_ids(lm.model, prompt, 32, temperature=0, use_cache=False)] == theirs
    with torch.no_grad():  # the repetition penalty works as transformers' does
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, repetition_penalty=1.3,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert [s.token for s in generate_ids(lm.model, prompt, 32, temperature=0, repetition_penalty=1.3)] == theirs


@pytest.mark.numerics
def test_import_export_roundtrip_through_transformers(ckpt, tmp_path):
    family, directory, hf = ckpt
    mine, back = tmp_path / "mine", tmp_path / "back"
    proc = run_cli("import", str(directory), "--out", str(mine))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((mine / "config.json").read_text())["model"]["extra"]["hf_family"] == family
    proc = run_cli("export", str(mine), "--format", "hf", "--out", str(back))
    assert proc.returncode == 0, proc.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(back)
    lm = load(mine, device="cpu")
    for text in SAMPLE_TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == lm.tokenizer.encode(text)


@pytest.mark.numerics
def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf_model("llama", tmp_path, shard="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        assert (load(tmp_path, device="cpu").model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    out = tmp_path / "exported"
    assert run_cli("import", str(tmp_path), "--out", str(tmp_path / "m")).returncode == 0
    assert run_cli("export", str(tmp_path / "m"), "--out", str(out), "--shard-size-mb", "0.05").returncode == 0
    assert (out / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.numerics
def test_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf = tiny_hf_model("llama", tmp_path, rope_scaling=scaling, rope_theta=500000.0)
    lm = load(tmp_path, device="cpu")
    assert lm.config.rope_scaling["type"] == "llama3" and lm.config.rope_theta == 500000.0
    ids = ids_for(hf.config.vocab_size, 100)  # well past the original 16 positions
    with torch.no_grad():
        assert (lm.model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(tmp_path, dtype):
    hf = tiny_hf_model("qwen2", tmp_path, dtype=dtype)
    kept = load(tmp_path, device="cpu")
    assert kept.model.wte.weight.dtype == dtype  # auto keeps the stored precision
    upcast = load(tmp_path, device="cpu", dtype="float32")
    ids = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        reference = hf.float()(ids).logits
        # measured 1e-5 (bf16), not reordering: transformers' rotary frequencies stay rounded to the checkpoint's
        # dtype after .float()
        assert (upcast.model(ids) - reference).abs().max().item() <= 1e-4


@pytest.mark.numerics
def test_export_models_trained_with_lmforge(tiny_run, corpus_dir, tmp_path):
    from lmforge.training.pretrain import PretrainConfig, pretrain

    llama_run = tmp_path / "llama_run"
    pretrain(PretrainConfig(data=[str(corpus_dir)], out=str(llama_run), arch="llama", n_layer=2, n_embd=64,
                            n_head=4, context_length=32, max_steps=3, vocab_size=300, device="cpu"))
    for run, expected in ((tiny_run, "GPT2LMHeadModel"), (llama_run, "LlamaForCausalLM")):
        out = tmp_path / f"hf_{run.name}"
        assert run_cli("export", str(run), "--out", str(out)).returncode == 0
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(hf).__name__ == expected
        lm = load(run, device="cpu")
        ids = ids_for(lm.tokenizer.vocab_size, 30)
        with torch.no_grad():  # trained logits (~10): fp32 reduction order ~1e-6, measured 0
            assert (hf(ids).logits - lm.model(ids)).abs().max().item() <= 1e-4
        tok = transformers.AutoTokenizer.from_pretrained(out)
        for text in SAMPLE_TEXTS:
            assert tok(text, add_special_tokens=False).input_ids == lm.tokenizer.encode(text)


@pytest.mark.parametrize("style", [gpt2_style, llama3_style, qwen_style, sentencepiece_style])
def test_tokenizer_parity_with_transformers(style, tmp_path):
    raw = style()
    raw.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_file(tmp_path / "tokenizer.json")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in SAMPLE_TEXTS:
        for add in (False, True):
            assert ours.encode(text, add_special_tokens=add) == theirs(text, add_special_tokens=add).input_ids
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, clean_up_tokenization_spaces=False)
        if style is not sentencepiece_style:  # byte-level BPE round-trips every string exactly
            assert ours.decode(ids) == text


def test_peak_memory_stays_near_the_weights(tmp_path):
    """Import streams tensors: peak RSS grows by about the size of the weights, not a multiple."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "big")
    llama3_style().save(str(tmp_path / "big" / "tokenizer.json"))
    weights = (tmp_path / "big" / "model.safetensors").stat().st_size
    # Resident memory before loading, then the peak during it. Writing 5 to clear_refs resets the
    # kernel's high-water mark (VmHWM), so the peak of importing torch does not hide the load's own.
    # A tiny meta-device model first: PyTorch's meta kernels cost ~70 MB of one-time imports, a fixed
    # cost unrelated to the weights.
    code = (
        "import sys, lmforge\n"
        "from lmforge.formats.hf import expected_tensors\n"
        "from lmforge.models.config import ModelConfig\n"
        "expected_tensors(ModelConfig(vocab_size=8, context_length=8, n_layer=1, n_head=1, n_embd=8))\n"
        "def status(key):\n"
        "    return next(int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith(key))\n"
        "before = status('VmRSS:')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "lm = lmforge.load(sys.argv[1], device='cpu')\n"
        "print(status('VmHWM:') - before)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big")], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    grown = int(proc.stdout.strip().splitlines()[-1])
    assert 0.9 * weights <= grown <= 1.3 * weights, (grown / 1e6, weights / 1e6)


# --- bad input -----------------------------------------------------------------------------------

def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom", "hidden_size": 8}))
    proc = run_cli("import", str(tmp_path), "--out", str(tmp_path / "out"))
    assert_clean_error(proc, "unsupported model_type 'bloom'; supported: gpt2, llama, mistral, qwen2, qwen3")
    assert not (tmp_path / "out").exists()


def test_missing_and_truncated_shards(tmp_path):
    src = tmp_path / "src"
    tiny_hf_model("llama", src, shard="60KB")
    shards = sorted(src.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("import", str(src), "--out", str(tmp_path / "o1")), "truncated")
    shards[1].unlink()
    assert_clean_error(run_cli("import", str(src), "--out", str(tmp_path / "o2")), f"missing shard {shards[1].name}")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_shape_disagrees_with_config(tmp_path):
    tiny_hf_model("qwen2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("import", str(tmp_path), "--out", str(tmp_path / "o")), "has shape")


def test_directory_without_weights(tmp_path):
    tiny_hf_model("gpt2", tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    assert_clean_error(run_cli("import", str(tmp_path), "--out", str(tmp_path / "o")), "no weights")


def test_tokenizer_that_does_not_fit_the_embeddings(tmp_path):
    tiny_hf_model("llama", tmp_path, vocab=4096)  # 4096 rows for a ~300-token tokenizer: wrong pairing
    assert_clean_error(run_cli("import", str(tmp_path), "--out", str(tmp_path / "o")), "different model")
    small = tmp_path / "small"
    tiny_hf_model("gpt2", small, vocab=128)  # fewer rows than tokens: ids would be out of range
    assert_clean_error(run_cli("import", str(small), "--out", str(tmp_path / "o2")), "do not belong together")


@pytest.mark.numerics
def test_gpt2_with_untied_output_layer(tmp_path):
    """Fine-tuned GPT-2s sometimes ship their own lm_head (tie_word_embeddings false)."""
    hf = tiny_hf_model("gpt2", tmp_path / "src", tie_word_embeddings=False)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    lm = load(tmp_path / "src", device="cpu")
    assert not lm.config.tie_embeddings
    ids = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(lm.model.lm_head.weight, hf.lm_head.weight)
        assert (lm.model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    mine, back = tmp_path / "mine", tmp_path / "back"
    assert run_cli("import", str(tmp_path / "src"), "--out", str(mine)).returncode == 0
    proc = run_cli("export", str(mine), "--out", str(back))
    assert proc.returncode == 0, proc.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert not reloaded.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(reloaded.lm_head.weight, hf.lm_head.weight)
        assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
