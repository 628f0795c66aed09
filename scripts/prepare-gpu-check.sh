#!/usr/bin/env bash
# Prepares .gpu/ (ignored by git) for scripts/check-gpu.sh, on a machine without a GPU: the
# CUDA build of tinygpt, the corpus, and nanoGPT (train.py, model.py, configurator.py and its
# shakespeare_char config, from a clone of karpathy/nanoGPT) with its data prepared as its own
# prepare.py would (characters sorted into ids, first 90% train, uint16 train.bin/val.bin,
# meta.pkl). The GPU machine needs no compiler and no network: carry .gpu/ there.
#
#   scripts/prepare-gpu-check.sh [CORPUS] [NANOGPT_CLONE]
#     CORPUS         default ../shared/data/tinyshakespeare.txt, else data/shakespeare.txt
#     NANOGPT_CLONE  a checkout, or a bare git directory, of https://github.com/karpathy/nanoGPT
#                    (default: cloned into ~/.cache/tinygpt/nanoGPT)
set -euo pipefail
cd "$(dirname "$0")/.."

corpus=${1:-}
if [ -z "$corpus" ]; then
    for c in ../shared/data/tinyshakespeare.txt data/shakespeare.txt; do
        [ -f "$c" ] && corpus=$c && break
    done
fi
[ -f "${corpus:-}" ] || { echo "prepare-gpu-check: no corpus; run data/prepare.sh or pass its path" >&2; exit 1; }
nanogpt=${2:-$HOME/.cache/tinygpt/nanoGPT}
nanogpt_file() { # a file of the checkout, or of a bare repository's HEAD
    if [ -f "$nanogpt/$1" ]; then cat "$nanogpt/$1"; else git --git-dir="$nanogpt" show "HEAD:$1"; fi
}
if ! nanogpt_file train.py >/dev/null 2>&1; then
    git clone --depth 1 https://github.com/karpathy/nanoGPT "$nanogpt"
fi

rm -rf .gpu && mkdir -p .gpu/nanoGPT/config .gpu/nanoGPT/data/shakespeare_char
scripts/build-cuda.sh
# Stripped and gzipped (61 MB → 17 MB: the embedded PTX is text): the device takes at most
# 64 MiB of working tree.
strip -o .gpu/tinygpt target/release/tinygpt
gzip -6 .gpu/tinygpt
cp "$corpus" .gpu/tinyshakespeare.txt
for f in train.py model.py configurator.py config/train_shakespeare_char.py; do
    nanogpt_file "$f" >".gpu/nanoGPT/$f"
done
python3 - .gpu/tinyshakespeare.txt .gpu/nanoGPT/data/shakespeare_char <<'EOF'
import pickle, sys
from array import array
text = open(sys.argv[1], encoding="utf-8").read()
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
n = int(0.9 * len(text))
for name, part in (("train", text[:n]), ("val", text[n:])):
    with open(f"{sys.argv[2]}/{name}.bin", "wb") as f:
        array("H", (stoi[c] for c in part)).tofile(f)  # uint16, little-endian on x86
meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
with open(f"{sys.argv[2]}/meta.pkl", "wb") as f:
    pickle.dump(meta, f)
print(f"nanoGPT data: {n} train / {len(text) - n} val characters, {len(chars)} in the vocabulary")
EOF
du -sh .gpu
echo "prepare-gpu-check: ready. On the GPU machine: scripts/check-gpu.sh (carry .gpu)"
