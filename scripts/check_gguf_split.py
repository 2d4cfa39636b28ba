#!/usr/bin/env python3
"""Reads every file of a split GGUF with gguf-py (PyPI `gguf`), each on its own,
and prints JSON: per file its split keys, keys and tensor names; then the totals.

usage: check_gguf_split.py FILE-00001-of-0000N.gguf [more files in order...]
"""
import json
import sys

import gguf


def value(field):
    return field.parts[field.data[0]].tolist()[0]


files = []
for path in sys.argv[1:]:
    r = gguf.GGUFReader(path)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    files.append({
        "path": path,
        "split.no": value(r.fields["split.no"]),
        "split.count": value(r.fields["split.count"]),
        "split.tensors.count": value(r.fields["split.tensors.count"]),
        "split_key_types": [int(r.fields[k].types[0]) for k in ("split.no", "split.tensors.count", "split.count")],
        "keys": keys,
        "tensors": [t.name for t in r.tensors],
    })
print(json.dumps({"files": files, "tensors": sum(len(f["tensors"]) for f in files)}))
