"""`lmforge inspect attention|lens`: what a model attends to, and how its prediction forms layer by
layer. Torch-free at import (the work is imported inside each function), so `--help` answers at once."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from ..core.config import arg, from_namespace
from .args import device_flag, quantize_flag
from .verbs import read_text_arg


@dataclass
class InspectAttentionArgs:
    """Attention maps: for each layer and head, how much each token attends to each earlier one
    (every other token, in an encoder). Draws a grid of heat maps, one row per layer and one column
    per head; --layer and --head pick one. Works for decoders, encoders, classifiers and reward models,
    and encoder-decoders (T5, BART): their encoder's, decoder's and cross-attention maps."""

    model_dir: str = arg(None, "model directory, Hugging Face directory or GGUF file", positional=True)
    text: str = arg(None, "the text to read ('-' reads stdin); at most the model's context")
    target: str | None = arg(None, "encoder-decoders only: the decoder's text, read after its start token "
                             "(default: the start token alone)")
    layer: int | None = arg(None, "only this layer (0 = the first)", ge=0)
    head: int | None = arg(None, "only this head (0 = the first)", ge=0)
    out: str = arg("attention.png", "the PNG to write")
    json: bool = arg(False, "print {\"tokens\", \"layers\", \"heads\", \"attention\": [layer][head][query][key]} "
                     "instead of drawing (an encoder-decoder adds \"decoder_tokens\", \"decoder_attention\" and "
                     "\"cross_attention\")")
    device: str = device_flag()
    quantize: str = quantize_flag()


@dataclass
class InspectLensArgs:
    """The logit lens: the final norm and output layer applied to the residual stream after the
    embeddings and after each block, so each row shows what the model would predict if it stopped
    there. Prints a table (input tokens down, depth across: the top token and its probability) and
    draws it as a heat map."""

    model_dir: str = arg(None, "model directory, Hugging Face directory or GGUF file (with an output "
                         "layer: a decoder or a masked language model)", positional=True)
    text: str = arg(None, "the text to read ('-' reads stdin); at most the model's context")
    top: int = arg(5, "how many of the likeliest tokens to keep per position and depth (--json)", ge=1, le=100)
    out: str | None = arg("lens.png", "the PNG to write (none: only the table)")
    json: bool = arg(False, "print {\"tokens\", \"predicts\", \"lens\": [depth][position] -> [[token, prob], ...]}")
    device: str = device_flag()
    quantize: str = quantize_flag()


def _load(a):
    from ..api import load

    return load(a.model_dir, device=a.device, quantize=a.quantize)


def attention(ns) -> None:
    a = from_namespace(InspectAttentionArgs, ns)
    text = read_text_arg(a.text, "text")
    from ..inference import inspect

    result = inspect.attention(_load(a), text, a.layer, a.head, a.target)
    if a.json:
        print(json.dumps(result))
        return
    inspect.plot_attention(result, a.out)
    dec = len(result.get("decoder_layers", []))
    more = f" + {dec} decoder layer(s) with cross-attention" if dec else ""
    print(f"{len(result['tokens'])} tokens, {len(result['layers'])} layer(s){more} x {len(result['heads'])} head(s) "
          f"-> {a.out}", file=sys.stderr)


def lens(ns) -> None:
    a = from_namespace(InspectLensArgs, ns)
    text = read_text_arg(a.text, "text")
    from ..inference import inspect

    result = inspect.lens(_load(a), text, a.top)
    if a.json:
        print(json.dumps(result))
        return
    print(inspect.lens_table(result))
    if a.out and a.out.lower() != "none":
        inspect.plot_lens(result, a.out)
        print(f"-> {a.out}", file=sys.stderr)
