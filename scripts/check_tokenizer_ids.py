#!/usr/bin/env python3
"""Token ids of a text under a tokenizer.json, by HF's `tokenizers` package.

Usage: check_tokenizer_ids.py TOKENIZER_JSON TEXT

Prints `<count> <sha256>`: the number of ids and the sha256 of their
little-endian u32 bytes (no special tokens added, special-token text left as
text, as llama.cpp's perplexity tokenizes), so a test compares whole id lists
without moving them around.
"""

import hashlib
import struct
import sys

from tokenizers import Tokenizer


def main() -> None:
    tok = Tokenizer.from_file(sys.argv[1])
    tok.encode_special_tokens = True
    text = open(sys.argv[2], encoding="utf-8").read()
    ids = tok.encode(text, add_special_tokens=False).ids
    digest = hashlib.sha256(b"".join(struct.pack("<I", i) for i in ids)).hexdigest()
    print(len(ids), digest)


if __name__ == "__main__":
    main()
