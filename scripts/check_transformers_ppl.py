"""Perplexity of HF folders computed by HF transformers itself, with
llama-perplexity's protocol (the one `compress eval` follows): the text tokenized
once without special tokens, cut into chunks of CTX tokens, each run on its own,
the logits at positions CTX/2 … CTX−2 scored against the tokens that follow.
Prints one JSON object per folder: {"folder", "model_type", "perplexity",
"text_tokens"}.

Needs PyTorch and transformers: run it with the venv of
scripts/setup-torch-venv.sh (.cache/venv-torch/bin/python); not part of CI.

Usage: check_transformers_ppl.py --text FILE --ctx N --chunks N FOLDER...
"""
import argparse
import json
import math
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def perplexity(folder, tokens, ctx, chunks):
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    if chunks * ctx > len(tokens):
        raise SystemExit(f"{folder}: {chunks} chunks of {ctx} need more than {len(tokens)} tokens")
    nll, count = 0.0, 0
    first = ctx // 2
    with torch.no_grad():
        for c in range(chunks):
            ids = torch.tensor([tokens[c * ctx:(c + 1) * ctx]])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            for i in range(first, ctx - 1):
                nll -= logp[i, ids[0, i + 1]].item()
                count += 1
    return model.config.model_type, math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, required=True)
    ap.add_argument("folders", nargs="+")
    args = ap.parse_args()
    text = open(args.text, encoding="utf-8").read()
    for folder in args.folders:
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        tokens = tok.encode(text, add_special_tokens=False).ids
        model_type, ppl = perplexity(folder, tokens, args.ctx, args.chunks)
        print(json.dumps({"folder": folder, "model_type": model_type,
                          "perplexity": ppl, "text_tokens": len(tokens)}), flush=True)


if __name__ == "__main__":
    main()
