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
from .parsing import Parser, unknown_flag

# verb: (its dataclass as "module:Class", its function: a name in verbs.py or "module:function", one line of help)
VERBS = {
    "demo": ("lmforge.cli.args:DemoArgs", "demo", "train a small GPT on Python's docs and sample from it (~5 min)"),
    "pretrain": ("lmforge.training.config:PretrainConfig", "pretrain",
                 "pretrain a model on raw text (next-token or masked-token prediction)"),
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
    "finetune": ("fine-tune a model: classify (labelled texts) or instruct (instructions)",
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
  lmforge generate runs/smol --prompt "The capital of France is" --temperature 0
  lmforge import model.Q4_K_M.gguf --out runs/from-gguf                   # a GGUF file of any common type, dequantised
  lmforge generate model.Q4_K_M.gguf -p "def main"                        # or use it directly: 4-bit stays 4-bit""",
    "export": """examples:
  lmforge export runs/py --format hf --out hf/py
  # then, in Python: AutoModelForCausalLM.from_pretrained("hf/py"), AutoTokenizer.from_pretrained("hf/py")
  lmforge export runs/py --format gguf --outtype q8_0 --out py.gguf      # for llama.cpp, Ollama, LM Studio
  llama-cli -m py.gguf -p "def main" -n 64                                # llama.cpp's own CLI
  lmforge export runs/py --format gguf --outtype f32 --out py.f32.gguf   # then: llama-quantize py.f32.gguf
                                                                          #   py.Q4_K_M.gguf Q4_K_M
  lmforge export runs/chat --format gguf --out out/chat.gguf --ollama    # plus out/Modelfile for Ollama""",
    "classify": """examples:
  lmforge classify runs/spam --text "WIN a FREE cruise, click now" "see you at lunch"
  lmforge classify runs/spam --file inbox.txt --json""",
    "chat": """example:
  lmforge chat runs/reverse --system "You are a concise assistant."
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
  lmforge serve runs/reverse --port 9000 --api-key "$(openssl rand -hex 16)" --slots 16
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Return the", "max_tokens": 20, "temperature": 0}'""",
    "demo": """example:
  lmforge demo --minutes 2""",
    "rag index": """examples:
  lmforge rag index pydocs --out runs/pydocs-index                 # the bundled MiniLM encoder
  lmforge rag index notes/ manual.md faq.jsonl --out runs/notes-index --chunk-tokens 160
  lmforge rag index notes/ manual.md faq.jsonl --out runs/notes-index   # again: only changed files""",
    "rag search": """examples:
  lmforge rag search runs/pydocs-index "serialize an object to a JSON string" -k 3
  lmforge rag search runs/pydocs-index "json.dumps" --mode bm25 --json""",
    "rag ask": """examples:
  lmforge rag ask runs/pydocs-index "How do I read a CSV file?" --model runs/py1k
  lmforge rag ask runs/pydocs-index "How do I read a CSV file?" --api http://127.0.0.1:8000/v1 --json
  lmforge rag ask runs/notes-index "When is the deadline?" --model runs/py1k --min-score 0.4""",
    "rag eval": """example:
  lmforge rag eval runs/notes-index --qa qa.jsonl -k 5 --mode all
  # qa.jsonl: {"question": "how do I reset my password?", "path": "faq.md"}""",
    "agent": """examples:
  lmforge agent --model runs/calc-agent --tools calculator "What is 4821 * 377?"
  lmforge agent --api http://127.0.0.1:8000/v1 --tools search:runs/pydocs-index,read:docs/ --confirm \\
                --log run.jsonl "Which function serializes an object to JSON?" """,
    "align reward": """examples:
  python examples/make_align_data.py data/align
  lmforge align reward runs/sft --data data/align/prefs.jsonl --val data/align/prefs_val.jsonl --out runs/rm
  lmforge score runs/rm --prompt "Describe the new list." --response "The new list holds the value!" """,
    "align dpo": """examples:
  lmforge align dpo runs/sft --data data/align/prefs.jsonl --out runs/dpo --beta 0.1 --loss sigmoid
  lmforge align dpo runs/smol-chat --data prefs.jsonl --out runs/smol-dpo --lora-rank 16 --template model""",
    "align rlhf": """examples:
  lmforge align rlhf runs/sft --reward runs/rm --prompts data/align/prompts.jsonl --out runs/grpo --max-steps 40
  cd examples && lmforge align rlhf ../runs/sft --reward-fn make_align_data:exclaims \\
      --prompts ../data/align/prompts.jsonl --out ../runs/grpo-fn --group-size 8 --kl-coef 0.04""",
    "rank": """example:
  lmforge rank runs/sft --prompts data/align/prompts.jsonl --out my_prefs.jsonl -k 3
  [1/200] Describe the new list.
    1) The new list holds the value.
    2) The new list reads the file!
    3) The new list sorts the key.
  ranking (best first, e.g. `2 1 3`; `2 = 1 3` ties 2 and 1; s = skip; q = quit): 2 1 = 3""",
    "score": """examples:
  lmforge score runs/rm --prompt "Describe the new list." --response "The new list holds the value!"
  lmforge score runs/rm -p "Describe the new list." -r "The new list holds the value." --json""",
    "eval": """examples:
  lmforge eval runs/demo                                          # the built-in tasks (arithmetic, pydocs, spam)
  lmforge eval runs/demo --task spam pydocs --shots 5 --json
  lmforge eval runs/demo --task qa.jsonl --limit 100             # {"context", "choices", "answer"} per line
  lmforge eval --api http://127.0.0.1:8000/v1 --task arithmetic  # a server, on generation tasks""",
    "judge": """examples:
  lmforge judge --api http://127.0.0.1:8000/v1 --answers answers.jsonl          # {question, answer} per line
  lmforge judge --api http://127.0.0.1:8000/v1 --answers pairs.jsonl --pairwise --rubric rubric.txt
  # prints {"pairs", "wins_a", "wins_b", "ties", "inconsistent", "win_rate_a", ...}; verdicts in pairs.judged.jsonl""",
    "scaling sweep": """examples:
  lmforge scaling sweep --data pydocs --sizes d1,d2,d3,d4 --flops 2e11,5e11,1.2e12 --out runs/sweep
  lmforge scaling sweep --data corpus/ --sizes d2,d4,d6 --flops 1e14,3e14,1e15 --out runs/big --jobs 4""",
    "scaling fit": """examples:
  lmforge scaling fit runs/sweep                            # runs/sweep/fit.json and fit.png
  lmforge scaling fit runs/sweep --max-flops 5e11 --out held.json   # fit the small budgets only""",
    "scaling predict": """examples:
  lmforge scaling predict runs/sweep/fit.json --n 3e6 --d 1e8
  lmforge scaling predict runs/sweep/fit.json --flops 1e15       # the compute-optimal N and D
  lmforge pretrain --size auto --scaling-fit runs/sweep/fit.json --max-tokens 5e7 --out runs/sized""",
    "inspect attention": """examples:
  lmforge inspect attention runs/demo --text "def add(a, b): return a + b" --out attn.png   # every layer and head
  lmforge inspect attention runs/demo --text "def add(a, b): return a + b" --layer 1 --head 0 --out l1h0.png
  lmforge inspect attention minilm --text "A man is eating food." --json                     # an encoder, as JSON""",
    "inspect lens": """examples:
  lmforge inspect lens runs/demo --text "Return a new list of the"           # a table; lens.png beside it
  lmforge inspect lens runs/bert --text "Return a new [MASK] of the items." --json --top 3""",
    "speedrun": """examples:
  lmforge speedrun                                     # ~30 minutes on a laptop CPU: runs/speedrun/report.md
  lmforge speedrun                                     # again after an interruption: it resumes
  lmforge speedrun --data notes/ --minutes 60 --out runs/notes-chat     # your text besides pydocs
  lmforge speedrun --preset gpu --out runs/speedrun-gpu                 # depth 12, bf16, torch.compile
  lmforge report runs/speedrun                          # rebuild report.md from the run directory""",
    "runs compare": """examples:
  lmforge runs compare runs/py runs/demo --metric val_bpb        # compare.png, and a table of final figures
  lmforge runs compare runs/sft runs/dpo --metric loss --x tokens --out sft-vs-dpo.png --json""",
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
