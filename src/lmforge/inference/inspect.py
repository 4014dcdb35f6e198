"""Seeing inside a model: attention maps and the logit lens (`lmforge inspect`).

Attention maps are each head's weights, softmax(q k^T / sqrt(d)), for every query and key token.
The logit lens (nostalgebraist, 2020) applies the final norm and the output layer to the residual
stream after each block, so you see which tokens the model would predict if it stopped there, and
how the prediction forms layer by layer.

An encoder-decoder (T5, BART) has three kinds of maps: the encoder's self-attention over the
text, the decoder's self-attention over its input (the start token, then a `target` text,
teacher-forced), and the decoder's cross-attention from each of its positions to the text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import LMForgeError
from ..core.fileio import atomic_path
from ..formats.load import Loaded
from ..text.tokenizer import printable


def _body(lm: Loaded):
    """The transformer inside: the model itself, or a classifier's or reward model's backbone."""
    return lm.model.backbone if lm.kind.pooled_head else lm.model


def encode(lm: Loaded, text: str) -> list[int]:
    """The text's token ids as the model reads it (with its own special tokens), within its context."""
    ids = lm.tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise LMForgeError("empty text: nothing to inspect")
    context = _body(lm).cfg.context_length
    if len(ids) > context:
        raise LMForgeError(f"the text is {len(ids)} tokens; the model's context is {context} (shorten it)")
    return ids


def _piece(lm: Loaded, i: int) -> str:
    """A token for display; embedding rows past the tokenizer (checkpoints pad them) by their id."""
    return lm.tokenizer.piece(i) if i < lm.tokenizer.vocab_size else f"<unused {i}>"


def pieces(lm: Loaded, ids: list[int]) -> list[str]:
    """The tokens for display (`Tokenizer.piece`; padded embedding rows by their id)."""
    return [_piece(lm, i) for i in ids]


def _check_index(name: str, value: int | None, count: int) -> None:
    if value is not None and not 0 <= value < count:
        raise LMForgeError(f"--{name} {value} is out of range: the model has {count} {name}s (0..{count - 1})")


def attention(lm: Loaded, text: str, layer: int | None = None, head: int | None = None,
              target: str | None = None) -> dict:
    """{"tokens": [...], "layers": [l...], "heads": [h...], "attention": [layer][head][query][key]},
    for the chosen layer/head or all of them. An encoder-decoder adds the decoder's input tokens
    ("decoder_tokens": the start token, then `target`), "decoder_layers", and its self-attention
    ("decoder_attention") and cross-attention ("cross_attention": [layer][head][decoder
    position][text token])."""
    body = _body(lm)
    cfg = body.cfg
    if cfg.is_encoder_decoder:
        return _seq2seq_attention(lm, text, layer, head, target)
    if target is not None:
        raise LMForgeError("a target text is for encoder-decoder models (T5, BART); this model reads one text")
    _check_index("layer", layer, cfg.n_layer)
    _check_index("head", head, cfg.n_head)
    ids = encode(lm, text)
    layers = [layer] if layer is not None else list(range(cfg.n_layer))
    heads = [head] if head is not None else list(range(cfg.n_head))
    weights, _ = body.inspect(torch.tensor([ids], device=lm.device), layers=layers)  # only those are kept
    maps = [[w[0, h].float().cpu().tolist() for h in heads] for w in weights]
    return {"tokens": [lm.tokenizer.piece(i) for i in ids], "layers": layers, "heads": heads, "attention": maps}


def attention_rows(lm: Loaded, ids: list[int], layer: int, head: int | None = None, start: int = 0) -> torch.Tensor:
    """Layer `layer`'s attention weights [T - start, T] (float32, on the CPU) for the queries from
    position `start` on: head `head`'s, or the mean over heads (None). Explicit weights are
    computed for that layer alone; the others run the fused kernels."""
    cfg = _body(lm).cfg
    if cfg.is_encoder_decoder:
        raise LMForgeError("attention rows over one sequence are for decoders and encoders; an encoder-decoder's "
                           "maps come from `lmforge inspect attention`")
    _check_index("layer", layer, cfg.n_layer)
    _check_index("head", head, cfg.n_head)
    weights, _ = _body(lm).inspect(torch.tensor([ids], device=lm.device), layers=[layer])
    w = weights[0][0, :, start:].float()  # [H, T - start, T]
    return (w.mean(0) if head is None else w[head]).cpu()


def _seq2seq_attention(lm: Loaded, text: str, layer: int | None, head: int | None, target: str | None) -> dict:
    body = _body(lm)
    cfg = body.cfg
    _check_index("layer", layer, min(cfg.n_layer, cfg.n_decoder_layer))
    _check_index("head", head, cfg.n_head)
    src = encode(lm, text)
    dec = [cfg.decoder_start_token_id] + (lm.tokenizer.encode(target) if target else [])
    if len(dec) > cfg.context_length:
        raise LMForgeError(f"the target is {len(dec)} tokens; the model's context is {cfg.context_length} (shorten it)")
    heads = [head] if head is not None else list(range(cfg.n_head))
    weights, _ = body.inspect(torch.tensor([src], device=lm.device), layers=None if layer is None else [layer],
                              decoder_input_ids=torch.tensor([dec], device=lm.device))

    def maps(ws: list[torch.Tensor]) -> list:
        return [[w[0, h].float().cpu().tolist() for h in heads] for w in ws]

    return {"tokens": [_piece(lm, i) for i in src], "decoder_tokens": [_piece(lm, i) for i in dec],
            "layers": [layer] if layer is not None else list(range(cfg.n_layer)),
            "decoder_layers": [layer] if layer is not None else list(range(cfg.n_decoder_layer)), "heads": heads,
            "attention": maps(weights["encoder"]), "decoder_attention": maps(weights["decoder"]),
            "cross_attention": maps(weights["cross"])}


def lens(lm: Loaded, text: str, top: int = 5) -> dict:
    """{"tokens": [...], "lens": [depth][position] -> [[token, prob], ...] (top `top`)}; depth 0 is
    the embeddings, depth L the last block (the model's own prediction)."""
    if _body(lm).cfg.is_encoder_decoder:
        raise LMForgeError(f"the logit lens reads decoders and masked language models; {lm.path} is {lm.kind.phrase}")
    if not lm.kind.has_lm_head:
        raise LMForgeError(f"the logit lens needs an output layer over tokens; {lm.path} is {lm.kind.phrase}")
    body = _body(lm)
    ids = encode(lm, text)
    _, stream = body.inspect(torch.tensor([ids], device=lm.device), layers=[])  # no weights: SDPA throughout
    rows = []
    with torch.no_grad():
        for x in stream:
            probs = body.head(body.norm(x))[0].float().softmax(-1)
            p, t = probs.topk(min(top, probs.shape[-1]), dim=-1)
            rows.append([[[_piece(lm, int(i)), round(float(q), 6)] for i, q in zip(ti, pi)]
                         for ti, pi in zip(t.tolist(), p.tolist())])
    # A decoder's position p predicts token p + 1; a masked LM's predicts the token at p.
    return {"tokens": [lm.tokenizer.piece(i) for i in ids], "predicts": "next" if lm.kind.generates else "same",
            "lens": rows}


def lens_table(result: dict, width: int = 10) -> str:
    """One row per input position, one column per depth: the top token there and its probability."""
    depths = len(result["lens"])
    cell = width + 5
    head = f"{'position':<{width + 6}}" + "".join(f"{('emb' if d == 0 else f'L{d}'):>{cell}}" for d in range(depths))
    lines = [head]
    for pos, tok in enumerate(result["tokens"]):
        cells = []
        for d in range(depths):
            piece, prob = result["lens"][d][pos][0]
            cells.append(f"{printable(piece)[:width]:>{width}} {prob:.2f}")
        lines.append(f"{pos:>3} {printable(tok)[:width + 2]:<{width + 3}}" + "".join(f"{c:>{cell}}" for c in cells))
    return "\n".join(lines)


def _save(fig, out: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_attention(result: dict, out: str | Path) -> None:
    """A grid of heat maps, one row per layer and one column per head (key tokens across, queries
    down); token labels on a single map, or when the text is short. An encoder-decoder's rows are
    the encoder's layers, then the decoder's self-attention, then its cross-attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, tokens = result["heads"], [printable(t) for t in result["tokens"]]
    rows = [("", li, m, tokens, tokens) for li, m in zip(result["layers"], result["attention"])]
    if "cross_attention" in result:
        dec = [printable(t) for t in result["decoder_tokens"]]
        rows = [("encoder ", *r[1:]) for r in rows]
        rows += [("decoder ", li, m, dec, dec) for li, m in zip(result["decoder_layers"], result["decoder_attention"])]
        rows += [("cross ", li, m, dec, tokens) for li, m in zip(result["decoder_layers"], result["cross_attention"])]
    size = 6.0 if len(rows) * len(heads) == 1 else max(1.6, min(3.0, 14 / max(len(heads), 1)))
    fig, axes = plt.subplots(len(rows), len(heads), figsize=(size * len(heads), size * len(rows)), squeeze=False)
    labels = len(rows) * len(heads) == 1 or len(tokens) <= 12
    for r, (kind, li, maps, queries, keys) in enumerate(rows):
        for c, h in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(maps[c], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{kind}layer {li} head {h}", fontsize=8)
            if labels:
                ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
                ax.set_yticks(range(len(queries)), queries, fontsize=7)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    _save(fig, out)


def plot_lens(result: dict, out: str | Path) -> None:
    """The lens as a heat map: depth down, position across, colour = the top token's probability,
    each cell labelled with that token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [printable(t) for t in result["tokens"]]
    depths = len(result["lens"])
    probs = [[result["lens"][d][p][0][1] for p in range(len(tokens))] for d in range(depths)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(tokens)), max(2.5, 0.45 * depths + 1)))
    ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for d in range(depths):
        for p in range(len(tokens)):
            piece, prob = result["lens"][d][p][0]
            ax.text(p, d, printable(piece)[:8], ha="center", va="center", fontsize=7,
                    color="white" if prob > 0.6 else "black")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(depths), ["emb"] + [f"L{d}" for d in range(1, depths)], fontsize=7)
    ax.set_xlabel("input token (the prediction is for the " +
                  ("next token)" if result.get("predicts") == "next" else "token at that position)"))
    ax.set_title("logit lens: top token after each block")
    _save(fig, out)

