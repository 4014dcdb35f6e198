"""`lmforge inspect`: attention maps equal transformers' `output_attentions` on imported tiny models,
the logit lens equals the output layer applied to transformers' hidden states, and the CLI draws,
prints JSON and refuses bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import tiny_bert, tiny_hf_model

import lmforge
from lmforge.cli import main
from lmforge.inference import inspect

TEXT = "The quick brown fox jumps over the lazy dog, and def f(x): return x"


def _hf(family: str, directory):
    import transformers as tf

    if family == "bert":
        tiny_bert(directory)
        return tf.BertForMaskedLM.from_pretrained(directory, attn_implementation="eager").eval()
    tiny_hf_model(family, directory)
    return tf.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_attention_and_lens_match_transformers(family, tmp_path):
    hf = _hf(family, tmp_path)
    lm = lmforge.load(tmp_path, dtype="float32")
    ids = inspect.encode(lm, TEXT)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    got = inspect.attention(lm, TEXT)
    assert len(got["attention"]) == len(ref.attentions) == lm.config.n_layer
    for layer, want in enumerate(ref.attentions):
        torch.testing.assert_close(torch.tensor(got["attention"][layer]), want[0], atol=1e-5, rtol=0)
    one = inspect.attention(lm, TEXT, layer=1, head=2)
    assert one["layers"] == [1] and one["heads"] == [2]  # layer 1 alone: layer 0 ran SDPA, so within float error
    torch.testing.assert_close(torch.tensor(one["attention"][0][0]), torch.tensor(got["attention"][1][2]),
                               atol=1e-5, rtol=0)
    if family != "bert":  # a causal model attends to nothing after the query
        assert torch.tensor(got["attention"]).triu(1).abs().max() == 0

    lens = inspect.lens(lm, TEXT, top=3)
    body = lm.model
    with torch.no_grad():  # depth d < L: transformers' hidden state d (its last one has the final norm applied)
        for depth in range(lm.config.n_layer):
            probs = body.head(body.norm(ref.hidden_states[depth]))[0].softmax(-1)
            p, t = probs.max(-1)
            assert [row[0][0] for row in lens["lens"][depth]] == [inspect._piece(lm, int(i)) for i in t]
            assert [row[0][1] for row in lens["lens"][depth]] == pytest.approx(p.tolist(), abs=1e-5)
        final = ref.logits[0].softmax(-1).max(-1)  # the last depth is the model's own prediction
    assert [row[0][1] for row in lens["lens"][-1]] == pytest.approx(final.values.tolist(), abs=1e-5)
    assert len(lens["lens"]) == lm.config.n_layer + 1 and len(lens["lens"][0][0]) == 3
    assert lens["predicts"] == ("same" if family == "bert" else "next")


def test_inspection_leaves_the_fast_path_untouched(tiny_run):
    lm = lmforge.load(tiny_run)
    ids = torch.tensor([inspect.encode(lm, "Return the list of")])
    before = lm.model(ids)
    weights, stream = lm.model.inspect(ids)
    assert len(weights) == lm.config.n_layer and len(stream) == lm.config.n_layer + 1
    assert all(b.attn.record is None for b in lm.model.blocks)
    assert not lm.model.blocks[0]._forward_hooks and not lm.model.blocks[0]._forward_pre_hooks
    torch.testing.assert_close(lm.model(ids), before, atol=0, rtol=0)
    torch.testing.assert_close(lm.model.head(lm.model.norm(stream[-1])), before, atol=1e-5, rtol=0)


def test_cli_draws_prints_and_refuses(tiny_run, tmp_path, capsys):
    out = tmp_path / "attn.png"
    assert main(["inspect", "attention", str(tiny_run), "--text", "Return the list", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", "attention", str(tiny_run), "--text", "Return the list", "--layer", "1", "--head", "0",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layers"] == [1] and result["heads"] == [0]
    assert len(result["attention"][0][0]) == len(result["tokens"])

    lens_png = tmp_path / "lens.png"
    assert main(["inspect", "lens", str(tiny_run), "--text", "Return the list", "--out", str(lens_png)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[-3:] == ["emb", "L1", "L2"] and " list" in table
    assert lens_png.read_bytes()[:4] == b"\x89PNG"

    for argv, words in [
        (["--layer", "7"], "--layer 7 is out of range: the model has 2 layers"),
        (["--head", "9"], "--head 9 is out of range"),
        (["--text", "word " * 200], "the model's context is 32"),
    ]:
        args = ["inspect", "attention", str(tiny_run), "--text", "Return the list", *argv]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_attention_matches_transformers(family, tmp_path, capsys):
    """Encoder self-, decoder self- and cross-attention equal transformers' output_attentions."""
    import transformers as tf
    from hf_fixtures import tiny_seq2seq

    tiny_seq2seq(family, tmp_path)
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    lm = lmforge.load(tmp_path, dtype="float32")
    target = "a lazy dog"
    got = inspect.attention(lm, TEXT, target=target)
    src = inspect.encode(lm, TEXT)
    dec = [lm.config.decoder_start_token_id] + lm.tokenizer.encode(target)
    assert len(got["decoder_tokens"]) == len(dec) > 1
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec]), output_attentions=True)
    for key, want in (("attention", ref.encoder_attentions), ("decoder_attention", ref.decoder_attentions),
                      ("cross_attention", ref.cross_attentions)):
        assert len(got[key]) == len(want) > 0
        for layer, w in enumerate(want):
            torch.testing.assert_close(torch.tensor(got[key][layer]), w[0], atol=1e-5, rtol=0)
    assert torch.tensor(got["decoder_attention"]).triu(1).abs().max() == 0  # the decoder is causal

    out = tmp_path / "attn.png"
    assert main(["inspect", "attention", str(tmp_path), "--text", TEXT, "--target", target, "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["inspect", "attention", str(tmp_path), "--text", TEXT, "--layer", "1", "--head", "2", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["decoder_tokens"] == [inspect._piece(lm, lm.config.decoder_start_token_id)]  # no target: start only
    first_row = torch.tensor(got["cross_attention"][1][2])[:1]  # the start token's row: it sees no later token
    torch.testing.assert_close(torch.tensor(one["cross_attention"][0][0]), first_row, atol=1e-5, rtol=0)
    for argv, words in [(["--text", "word " * 300], f"the model's context is {lm.config.context_length}"),
                        (["--text", TEXT, "--layer", "2"], "--layer 2 is out of range")]:
        assert main(["inspect", "attention", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["inspect", "lens", str(tmp_path), "--text", TEXT]) == 2
    assert "sequence-to-sequence" in capsys.readouterr().err
