#!/usr/bin/env python3
"""The Python route a nanoGPT user takes, for comparison with `tinygpt prepare`: tiktoken's GPT-2
encoding over the same inputs (.txt/.md files and .jsonl.gz), THREADS threads, documents ended
by <|endoftext|>, ids appended to one uint16 file through np.memmap, as nanoGPT's
data/openwebtext/prepare.py writes train.bin. Prints MB/s.

    python3 scripts/tiktoken-prepare.py INPUT_DIR OUT.bin GPT2_TIKTOKEN_FILE [THREADS]

GPT2_TIKTOKEN_FILE: the GPT-2 ranks (tiktoken's own download location is not always reachable;
openai-whisper's sdist carries them as whisper/assets/gpt2.tiktoken).
"""
import gzip
import json
import os
import sys
import time

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

src, out, ranks_file = sys.argv[1:4]
threads = int(sys.argv[4]) if len(sys.argv) > 4 else os.cpu_count()
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(ranks_file),
                        special_tokens={"<|endoftext|>": 50256})
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)


def documents():
    for path in files:
        if path.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]
        else:
            with open(path, encoding="utf-8") as f:
                yield f.read()


t0 = time.time()
total_bytes = sum(os.path.getsize(p) for p in files)
capacity = total_bytes  # GPT-2 averages well under one token per byte
arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(capacity,))
pos, batch, size = 0, [], 0
for doc in documents():
    batch.append(doc)
    size += len(doc)
    if size >= 16 << 20:
        for ids in enc.encode_ordinary_batch(batch, num_threads=threads):
            ids.append(enc.eot_token)
            arr[pos:pos + len(ids)] = ids
            pos += len(ids)
        batch, size = [], 0
for ids in enc.encode_ordinary_batch(batch, num_threads=threads):
    ids.append(enc.eot_token)
    arr[pos:pos + len(ids)] = ids
    pos += len(ids)
arr.flush()
del arr
os.truncate(out, pos * 2)
dt = time.time() - t0
print(f"tiktoken gpt2, {threads} threads: {total_bytes / 1e6:.0f} MB ({len(files)} files) -> {pos} tokens in {dt:.1f} s: {total_bytes / 1e6 / dt:.1f} MB/s")
