#!/usr/bin/env python3
"""Writes a large mixed corpus for measuring `tinygpt prepare` (not for training anything good).

The paragraphs of data/shakespeare.txt (the Gutenberg texts that data/prepare.sh fetches) are
repeated and shuffled (seeded) until the corpus reaches --gb gigabytes, then written as about two
thirds plain files in nested folders (.txt and .md, a few thousand of them) and one third JSON Lines
(.jsonl.gz, one document of ~30 paragraphs per line, field "text").

    python3 scripts/make-big-corpus.py OUT_DIR [--gb 2] [--source data/shakespeare.txt]
"""
import argparse
import gzip
import json
import os
import random

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--gb", type=float, default=2.0)
ap.add_argument("--source", default="data/shakespeare.txt")
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()

paras = [p.strip("\n") for p in open(a.source, encoding="utf-8").read().split("\n\n") if p.strip()]
rng = random.Random(a.seed)
target = int(a.gb * 1e9)
plain_target = target * 2 // 3
os.makedirs(a.out, exist_ok=True)
written = 0
files = 0


def shuffled():
    while True:
        order = list(range(len(paras)))
        rng.shuffle(order)
        for i in order:
            yield paras[i]


stream = shuffled()
# Plain files: 300–1,100 KB each, in 40 folders.
while written < plain_target:
    size = rng.randint(300_000, 1_100_000)
    parts, n = [], 0
    while n < size:
        p = next(stream)
        parts.append(p)
        n += len(p) + 2
    folder = os.path.join(a.out, f"books-{files % 40:02d}")
    os.makedirs(folder, exist_ok=True)
    ext = "md" if files % 3 == 0 else "txt"
    with open(os.path.join(folder, f"part-{files:05d}.{ext}"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(parts) + "\n")
    written += n
    files += 1
# JSON Lines, gzip-compressed, ~64 MB of text per file.
shard = 0
while written < target:
    path = os.path.join(a.out, f"docs-{shard:03d}.jsonl.gz")
    n_file = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        while n_file < 64_000_000 and written < target:
            doc = "\n\n".join(next(stream) for _ in range(30))
            f.write(json.dumps({"text": doc}) + "\n")
            n_file += len(doc)
            written += len(doc)
    shard += 1
    files += 1
print(f"{a.out}: {files} files, {written / 1e9:.2f} GB of text")
