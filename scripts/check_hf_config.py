"""Loads a folder's config.json with HF transformers (its own validation, no
PyTorch needed for configs) and prints the shapes it derives as JSON.

Usage: check_hf_config.py FOLDER
"""
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from transformers import AutoConfig  # noqa: E402

c = AutoConfig.from_pretrained(sys.argv[1])
print(json.dumps({
    "model_type": c.model_type, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
    "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
    "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
}))
