"""The `lmforge` command: one verb per stage, each a thin layer over a library function.

Every verb takes `--config FILE.yaml` (keys = flag names) with flags overriding the file.
Problems with the input are reported as one line on stderr with exit code 2. Only the parser of
the verb being run is built, and nothing imports torch until a verb runs, so `--help` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..core.config import add_arguments
from ..core.errors import LMForgeError, PeerFailed
from . import verbs

# verb: (its dataclass as "module:Class", its function: a name in verbs.py or "module:function", one line of help)
VERBS = {
    "demo": ("lmforge.cli.args:DemoArgs", "demo", "train a small GPT on Python's docs and sample from it (~5 min)"),
    "pretrain": ("lmforge.training.config:PretrainConfig", "pretrain",
                 "pretrain a model on raw text (next-token or masked-token prediction)"),
    "generate": ("lmforge.cli.args:GenerateArgs", "generate", "generate text from a prompt"),
    "evaluate": ("lmforge.cli.args:EvaluateArgs", "evaluate",
                 "measure a model on data: loss/perplexity/bits per byte, exact match, or accuracy (JSON)"),
    "import": ("lmforge.cli.args:ImportArgs", "import_", "convert a Hugging Face checkpoint into a model directory"),
    "export": ("lmforge.cli.args:ExportArgs", "export", "write a model directory as a Hugging Face checkpoint"),
    "finetune classify": ("lmforge.training.config:ClassifyConfig", "finetune_classify",
                          "train a classifier on labelled texts"),
    "finetune instruct": ("lmforge.training.config:InstructConfig", "finetune_instruct",
                          "teach a model to follow instructions"),
    "classify": ("lmforge.cli.args:ClassifyArgs", "classify", "label texts with a fine-tuned classifier"),
    "chat": ("lmforge.cli.args:ChatArgs", "chat", "talk to a model in the terminal"),
    "serve": ("lmforge.cli.args:ServeArgs", "serve", "serve a model with OpenAI's HTTP API"),
    "merge-lora": ("lmforge.cli.args:MergeLoraArgs", "merge_lora", "fold a LoRA adapter into its base model"),
    "embed": ("lmforge.cli.args:EmbedArgs", "embed", "sentence embeddings and semantic search with an encoder"),
    "fill-mask": ("lmforge.cli.args:FillMaskArgs", "fill_mask", "predict masked words with a BERT-style model"),
    "tokenizer train": ("lmforge.cli.args:TokenizerTrainArgs", "tokenizer_train", "train a BPE tokenizer on text"),
    "tokenizer encode": ("lmforge.cli.args:TokenizerEncodeArgs", "tokenizer_encode", "show the tokens of a text"),
}
GROUPS = {  # verbs with sub-verbs: (one line of help, description)
    "finetune": ("fine-tune a model: classify (labelled texts) or instruct (instructions)",
                 "Fine-tune a pretrained (or imported) model, fully or with LoRA."),
    "tokenizer": ("train a tokenizer, or see how one splits text",
                  "Byte-level BPE tokenizers (Hugging Face tokenizer.json format)."),
}

EXAMPLES = {
    "pretrain": """examples:
  lmforge pretrain --data pydocs --out runs/py --max-minutes 10          # size chosen for the budget
  lmforge pretrain --data notes/ more.jsonl --out runs/notes --arch llama --size d6 --max-steps 2000
  lmforge pretrain --out runs/py --resume                                # continue with the saved budget
  lmforge pretrain --out runs/py --resume --max-steps 6000               # or extend it
  torchrun --nproc_per_node 4 -m lmforge pretrain --data corpus/ --out runs/big --max-tokens 1e9
  lmforge pretrain --data pydocs --out runs/adamw --max-minutes 10 --optimizer adamw --qk-norm  # not Muon; QK-norm
  torchrun --nproc_per_node 8 -m lmforge pretrain --data corpus/ --out runs/huge --size d32 --fsdp""",
    "generate": """examples:
  lmforge generate runs/demo --prompt "Return the" --temperature 0.7 --top-k 40 --seed 1
  lmforge generate runs/demo -p "class" --temperature 0                  # greedy
  lmforge generate runs/demo -p "The module" --top-candidates 5 --max-new-tokens 5""",
    "import": """examples:
  lmforge import ~/models/SmolLM2-135M --out runs/smol
  lmforge generate runs/smol --prompt "The capital of France is" --temperature 0""",
    "export": """example:
  lmforge export runs/py --format hf --out hf/py
  # then, in Python: AutoModelForCausalLM.from_pretrained("hf/py"), AutoTokenizer.from_pretrained("hf/py")""",
    "classify": """examples:
  lmforge classify runs/spam --text "WIN a FREE cruise, click now" "see you at lunch"
  lmforge classify runs/spam --file inbox.txt --json""",
    "chat": """example:
  lmforge chat runs/assistant --system "You are a concise assistant."
  you> What does zip() do?""",
    "merge-lora": """example:
  lmforge merge-lora runs/spam-lora --out runs/spam-merged""",
    "embed": """examples:
  lmforge embed minilm --text "A cat sits on the mat." "Stocks fell sharply." --out vectors.npy
  lmforge embed minilm --file faq.txt --query "how do I reset my password?" --top-k 3""",
    "fill-mask": """example:
  lmforge fill-mask runs/bert "The [MASK] function returns a new list." """,
    "evaluate": """examples:
  lmforge evaluate runs/demo --data held_out.txt
  -> {"loss": 3.21, "perplexity": 24.8, "bits_per_byte": 1.27, "tokens": 52110}
  lmforge evaluate runs/spam --data data/spam_val.csv           # a classifier: accuracy, macro-F1, ...
  lmforge evaluate runs/reverse --data data/reverse_test.jsonl  # instruction records: exact match""",
    "finetune classify": """examples:
  lmforge finetune classify runs/demo --train data/spam_train.csv --val data/spam_val.csv --out runs/spam
  lmforge finetune classify runs/demo --train data/spam_train.csv --out runs/spam-lora --lora-rank 8""",
    "finetune instruct": """examples:
  lmforge finetune instruct runs/demo --data data/reverse_train.jsonl --out runs/reverse --max-steps 300
  lmforge finetune instruct runs/smol --data chats.jsonl --out runs/smol-chat --template model --lora-rank 16""",
    "tokenizer train": """example:
  lmforge tokenizer train --data corpus/ --out tokenizer.json --vocab-size 8192""",
    "tokenizer encode": """example:
  lmforge tokenizer encode runs/demo --text "def f(x): return x" """,
    "serve": """examples:
  lmforge serve runs/demo                       # http://127.0.0.1:8000/v1, for any OpenAI client
  lmforge serve runs/assistant --port 9000 --api-key "$(openssl rand -hex 16)" --slots 16
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Return the", "max_tokens": 20, "temperature": 0}'""",
    "demo": """example:
  lmforge demo --minutes 2""",
}


def _dataclass(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _function(spec: str):
    """A verb's function, imported only when that verb runs."""
    if ":" in spec:
        return _dataclass(spec)
    return getattr(verbs, spec)


def _add_verb(sub, name: str, with_flags: bool) -> None:
    spec, func, help_text = VERBS[name]
    cls = _dataclass(spec) if with_flags else None
    p = sub.add_parser(name.split()[-1], help=help_text, description=((cls and cls.__doc__) or help_text).strip(),
                       epilog=EXAMPLES.get(name), formatter_class=argparse.RawDescriptionHelpFormatter)
    if cls is not None:
        add_arguments(p, cls)
    p.set_defaults(func=func)


def chosen_verb(argv: list[str]) -> str | None:
    """The verb named on the command line ("finetune classify", "generate", ...), if any."""
    words = [a for a in argv if not a.startswith("-")][:2]
    if not words:
        return None
    name = " ".join(words) if words[0] in GROUPS else words[0]
    return name if name in VERBS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `lmforge` parser. With `argv`, only the verb it names gets its flags (the others need not
    import their modules); without, every verb does."""
    from .. import __version__

    chosen = chosen_verb(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="lmforge", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="lmforge: train, run and adapt language models, end to end.",
        epilog="Run `lmforge VERB --help` for each verb's options. Start with `lmforge demo`.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="VERB")
    groups = {}
    for name in VERBS:
        group, _, leaf = name.rpartition(" ")
        target = sub
        if group:
            if group not in groups:
                g = sub.add_parser(group, help=GROUPS[group][0], description=GROUPS[group][1])
                groups[group] = g.add_subparsers(dest="sub", metavar="TASK" if group == "finetune" else "ACTION",
                                                 required=True)
            target = groups[group]
        _add_verb(target, name, with_flags=argv is None or chosen == name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        _function(ns.func)(ns)
    except LMForgeError as e:
        rank = os.environ.get("RANK", "0")  # under torchrun: rank 0 speaks; others only of their own failures
        if rank == "0" or not isinstance(e, PeerFailed):
            print(f"{'' if rank == '0' else f'rank {rank}: '}error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmforge generate ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
