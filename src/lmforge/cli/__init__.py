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
from .examples import EXAMPLES
from .parsing import Parser, unknown_flag

# verb: (its dataclass as "module:Class", its function: a name in verbs.py or "module:function", one line of help)
VERBS = {
    "demo": ("lmforge.cli.args:DemoArgs", "demo", "train a small GPT on Python's docs and sample from it (~5 min)"),
    "pretrain": ("lmforge.training.config:PretrainConfig", "pretrain",
                 "pretrain a model on raw text (next-token, masked-token, span or denoising objectives) or pairs"),
    "generate": ("lmforge.cli.args:GenerateArgs", "generate", "generate text from a prompt"),
    "evaluate": ("lmforge.cli.args:EvaluateArgs", "evaluate",
                 "measure a model on data: loss/perplexity/bits per byte, exact match, or accuracy (JSON)"),
    "import": ("lmforge.cli.args:ImportArgs", "import_",
               "convert a Hugging Face checkpoint or GGUF file into a model directory"),
    "export": ("lmforge.cli.args:ExportArgs", "export",
               "write a model directory as a Hugging Face checkpoint or a GGUF file"),
    "finetune classify": ("lmforge.training.config:ClassifyConfig", "finetune_classify",
                          "train a classifier on labelled texts"),
    "finetune instruct": ("lmforge.training.config:InstructConfig", "finetune_instruct",
                          "teach a model to follow instructions"),
    "finetune seq2seq": ("lmforge.training.config:Seq2SeqConfig", "finetune_seq2seq",
                         "train an encoder-decoder (T5, BART) on input -> target pairs"),
    "classify": ("lmforge.cli.args:ClassifyArgs", "classify", "label texts with a fine-tuned classifier"),
    "chat": ("lmforge.cli.args:ChatArgs", "chat", "talk to a model in the terminal"),
    "serve": ("lmforge.cli.args:ServeArgs", "serve", "serve a model with OpenAI's HTTP API"),
    "merge-lora": ("lmforge.cli.args:MergeLoraArgs", "merge_lora", "fold a LoRA adapter into its base model"),
    "embed": ("lmforge.cli.args:EmbedArgs", "embed", "sentence embeddings and semantic search with an encoder"),
    "fill-mask": ("lmforge.cli.args:FillMaskArgs", "fill_mask", "predict masked words with a BERT-style model"),
    "tokenizer train": ("lmforge.cli.args:TokenizerTrainArgs", "tokenizer_train", "train a BPE tokenizer on text"),
    "tokenizer encode": ("lmforge.cli.args:TokenizerEncodeArgs", "tokenizer_encode", "show the tokens of a text"),
    "rag index": ("lmforge.cli.rag:RagIndexArgs", "lmforge.cli.rag:rag_index", "index documents for retrieval"),
    "rag search": ("lmforge.cli.rag:RagSearchArgs", "lmforge.cli.rag:rag_search", "search an index"),
    "rag ask": ("lmforge.cli.rag:RagAskArgs", "lmforge.cli.rag:rag_ask", "answer a question from an index, citing "
                "sources"),
    "rag eval": ("lmforge.cli.rag:RagEvalArgs", "lmforge.cli.rag:rag_eval", "measure retrieval: recall@k and MRR"),
    "agent": ("lmforge.cli.rag:AgentArgs", "lmforge.cli.rag:agent", "solve a task with tools (calculator, search, "
              "read) in a ReAct loop"),
    "align reward": ("lmforge.training.align_config:RewardConfig", "lmforge.cli.align:reward",
                     "train a reward model on preferences (which answer people liked better)"),
    "align dpo": ("lmforge.training.align_config:DPOConfig", "lmforge.cli.align:dpo",
                  "align a model directly on preferences (DPO, IPO, hinge)"),
    "align rlhf": ("lmforge.training.align_config:RLHFConfig", "lmforge.cli.align:rlhf",
                   "reinforcement learning from a reward model or a reward function (GRPO)"),
    "rank": ("lmforge.cli.align:RankArgs", "lmforge.cli.align:rank",
             "rank sampled answers at the terminal, writing preference data"),
    "score": ("lmforge.cli.align:ScoreArgs", "lmforge.cli.align:score", "score an answer with a reward model"),
    "eval": ("lmforge.cli.evals:EvalArgs", "lmforge.cli.evals:eval_",
             "score a model on tasks: multiple choice, generation, perplexity (lm-evaluation-harness rules)"),
    "judge": ("lmforge.cli.evals:JudgeArgs", "lmforge.cli.evals:judge",
              "grade answers with an LLM judge: 1-10 ratings, or pairwise A/B with position swapping"),
    "scaling sweep": ("lmforge.cli.evals:ScalingSweepArgs", "lmforge.cli.evals:scaling_sweep",
                      "run an IsoFLOP grid of pretraining runs (resumable)"),
    "scaling fit": ("lmforge.cli.evals:ScalingFitArgs", "lmforge.cli.evals:scaling_fit",
                    "fit the scaling law to a sweep (approaches 2 and 3), with a plot"),
    "scaling predict": ("lmforge.cli.evals:ScalingPredictArgs", "lmforge.cli.evals:scaling_predict",
                        "predict a loss, or the compute-optimal size for a budget, from a fit"),
    "inspect attention": ("lmforge.cli.inspect:InspectAttentionArgs", "lmforge.cli.inspect:attention",
                          "draw what each layer and head attends to (heat maps, or --json)"),
    "inspect lens": ("lmforge.cli.inspect:InspectLensArgs", "lmforge.cli.inspect:lens",
                     "the logit lens: what the model would predict after each layer (a table and a heat map)"),
    "speedrun": ("lmforge.cli.speedrun:SpeedrunArgs", "lmforge.cli.speedrun:speedrun",
                 "raw text to a chat model in one command: pretrain, SFT, DPO, eval, RAG, and a report card"),
    "report": ("lmforge.cli.speedrun:ReportArgs", "lmforge.cli.speedrun:report",
               "rebuild a speedrun's report.md from its run directory"),
    "runs compare": ("lmforge.cli.runs:RunsCompareArgs", "lmforge.cli.runs:compare",
                     "plot a metric of several training runs on one chart, with a table of their final figures"),
}
GROUPS = {  # verbs with sub-verbs: (one line of help, description)
    "finetune": ("fine-tune a model: classify (labelled texts), instruct (instructions) or seq2seq (input -> "
                 "target pairs)",
                 "Fine-tune a pretrained (or imported) model, fully or with LoRA."),
    "tokenizer": ("train a tokenizer, or see how one splits text",
                  "Byte-level BPE tokenizers (Hugging Face tokenizer.json format)."),
    "rag": ("ask your documents: index, search, ask with cited sources, evaluate retrieval",
            "Retrieval-augmented generation: answers that cite the chunks they come from."),
    "align": ("align a model with preferences: reward (a reward model), dpo, or rlhf",
              "Alignment: a reward model from preferences, DPO from preferences directly, or RLHF (GRPO/PPO)."),
    "scaling": ("scaling laws: sweep (IsoFLOP runs), fit (Chinchilla approaches 2 and 3), predict",
                "Measure how loss falls with parameters and data, fit the law, and size a model for a budget."),
    "inspect": ("see inside a model: attention (maps per layer and head) or lens (predictions layer by layer)",
                "Inspection: what a model attends to, and how its prediction forms layer by layer."),
    "runs": ("training runs side by side: compare (one metric of each on one chart, and their final figures)",
             "Read training runs' metrics.jsonl (every training verb writes one; TensorBoard files are in RUN/tb/)."),
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
    parser = Parser(
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
    try:
        ns, extras = parser.parse_known_args(argv)
    except SystemExit as e:  # --help and --version end here (0); argparse's errors, already one line (2)
        if e.code in (0, None):
            raise
        return int(e.code)
    if extras:
        print(f"error: {unknown_flag(parser, ns, extras)}", file=sys.stderr)
        return 2
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
