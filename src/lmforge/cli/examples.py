"""The examples at the end of each verb's `--help` (and in the CLI reference): commands that show the
verb's common uses, each on one line with what it does."""

EXAMPLES = {
    "pretrain": """examples:
  lmforge pretrain --data pydocs --out runs/py --max-minutes 10          # size chosen for the budget
  lmforge pretrain --data notes/ more.jsonl --out runs/notes --arch llama --size d6 --max-steps 2000
  lmforge pretrain --out runs/py --resume                                # continue with the saved budget
  lmforge pretrain --out runs/py --resume --max-steps 6000               # or extend it
  torchrun --nproc_per_node 4 -m lmforge pretrain --data corpus/ --out runs/big --max-tokens 1e9
  lmforge pretrain --data pydocs --out runs/adamw --max-minutes 10 --optimizer adamw --qk-norm  # not Muon; QK-norm
  torchrun --nproc_per_node 8 -m lmforge pretrain --data corpus/ --out runs/huge --size d32 --fsdp
  lmforge pretrain --objective span --arch t5 --data corpus/ --out runs/t5 --size d4 --max-minutes 30  # T5-style
  lmforge pretrain --objective denoise --arch bart --data corpus/ --out runs/bart --size d4 --max-steps 2000
  lmforge pretrain --objective seq2seq --data data/dates/train.jsonl --val-data data/dates/valid.jsonl \\
      --out runs/dates --size d3 --context-length 32 --batch-size 64 --max-minutes 5  # pairs, from scratch""",
    "generate": """examples:
  lmforge generate runs/demo --prompt "Return the" --temperature 0.7 --top-k 40 --seed 1
  lmforge generate runs/demo -p "class" --temperature 0                  # greedy
  lmforge generate runs/demo -p "The module" --top-candidates 5 --max-new-tokens 5
  lmforge generate runs/dates -p "March 5th, 2021" --temperature 0       # an encoder-decoder: prints its output""",
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
  lmforge evaluate runs/reverse --data data/reverse_test.jsonl  # instruction records: exact match
  lmforge evaluate runs/dates --data data/dates/test.jsonl      # an encoder-decoder: exact match, BLEU, chrF""",
    "finetune classify": """examples:
  lmforge finetune classify runs/demo --train data/spam_train.csv --val data/spam_val.csv --out runs/spam
  lmforge finetune classify runs/demo --train data/spam_train.csv --out runs/spam-lora --lora-rank 8""",
    "finetune instruct": """examples:
  lmforge finetune instruct runs/demo --data data/reverse_train.jsonl --out runs/reverse --max-steps 300
  lmforge finetune instruct runs/smol --data chats.jsonl --out runs/smol-chat --template model --lora-rank 16""",
    "finetune seq2seq": """examples:
  lmforge finetune seq2seq runs/dates --data more_dates.jsonl --out runs/dates-ft --epochs 2
  lmforge import ~/models/flan-t5-small --out runs/flan
  lmforge finetune seq2seq runs/flan --data pairs.csv --input-column question --target-column answer \\
      --out runs/flan-qa --lora-rank 8""",
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
  lmforge rag ask runs/pydocs-index "How do I read a CSV file?" --model runs/speedrun/aligned
  lmforge rag ask runs/pydocs-index "How do I read a CSV file?" --api http://127.0.0.1:8000/v1 --json
  lmforge rag ask runs/notes-index "When is the deadline?" --model runs/speedrun/aligned --min-score 0.4""",
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
  lmforge inspect attention runs/demo --text "def add(a, b): return a + b" --layer 0 --head 0 --out l0h0.png
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
