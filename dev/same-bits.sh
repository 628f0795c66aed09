#!/usr/bin/env bash
# Same bits: runs every command whose numbers a restructuring must not change with one tinygpt
# binary and writes what they produce under OUT; `dev/same-bits.sh compare A B` then says which
# outputs differ. Checkpoints are compared tensor by tensor (safetensors metadata keys come in
# no fixed order), everything else byte for byte, with wall-clock times removed.
#
#   cargo build --release && cp target/release/tinygpt /tmp/before
#   … change …
#   dev/same-bits.sh run /tmp/before /tmp/out-before
#   dev/same-bits.sh run target/release/tinygpt /tmp/out-after
#   dev/same-bits.sh compare /tmp/out-before /tmp/out-after
#
# Corpus: ../shared/data/tinyshakespeare.txt (or $CORPUS). About 3 minutes on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

run() {
  local bin out corpus
  bin=$(realpath "$1"); out=$2
  corpus=$(realpath "${CORPUS:-$here/../shared/data/tinyshakespeare.txt}")
  rm -rf "$out"; mkdir -p "$out"
  cd "$here"
  local small=(--set training.max_iters=30 --set training.eval_interval=10 --set training.eval_iters=4
               --set training.checkpoint_interval=10 --set model.dropout=0.1 --set training.warmup_iters=5
               --set training.lr_decay_iters=40 --quiet)
  for engine in reference fused; do
    "$bin" train --config configs/shakespeare-char.toml --data "$corpus" --out "$out/ckpt-$engine" \
      --engine "$engine" "${small[@]}" > "$out/train-$engine.txt" 2>&1
    "$bin" train --resume "$out/ckpt-$engine" --set training.max_iters=40 --engine "$engine" --quiet \
      > "$out/resume-$engine.txt" 2>&1
    "$bin" generate --checkpoint "$out/ckpt-$engine" --prompt "ROMEO:" --max-new-tokens 200 --seed 3 \
      --engine "$engine" > "$out/generate-$engine.txt" 2>&1
    "$bin" eval --checkpoint "$out/ckpt-$engine" --data "$corpus" --json --engine "$engine" \
      > "$out/eval-$engine.json" 2>&1
    "$bin" logits --checkpoint "$out/ckpt-$engine" --prompt "ROMEO: I love" --top 8 --json \
      --engine "$engine" > "$out/logits-$engine.json" 2>&1
  done
  # A single-head model with rotary positions, Muon and the induction recipe's options.
  "$bin" train --config configs/induction.toml --data "$corpus" --out "$out/ckpt-induction" \
    --set model.n_head=1 --set training.max_iters=20 --set training.eval_interval=10 \
    --set training.eval_iters=2 --set training.checkpoint_interval=10 --set training.warmup_iters=5 \
    --set training.lr_decay_iters=20 --set training.cooldown_iters=5 --quiet > "$out/train-induction.txt" 2>&1
  "$bin" generate --checkpoint "$out/ckpt-induction" --prompt "ab" --max-new-tokens 60 --seed 5 \
    > "$out/generate-induction.txt" 2>&1
  local ck=$out/ckpt-reference
  "$bin" attention --checkpoint "$ck" --prompt "ROMEO: I love thee" --format json > "$out/attention.json" 2>&1
  "$bin" heads --checkpoint "$ck" --data "$corpus" --tokens 2048 --induction-seqs 8 --json > "$out/heads.json" 2>&1
  "$bin" patch --checkpoint "$ck" --clean "ROMEO: I lov" --corrupted "JULIET: I lo" --answer e --wrong o \
    --json > "$out/patch.json" 2>&1 || true
  "$bin" patch --checkpoint "$ck" --clean "ROMEO: lov" --corrupted "ROMEO: mov" --answer e --wrong o \
    --json > "$out/patch2.json" 2>&1
  "$bin" attribute --checkpoint "$ck" --prompt "ROMEO: I lov" --json > "$out/attribute.json" 2>&1
  "$bin" inspect "$ck" --json > "$out/inspect.json" 2>&1
  head -c 300000 "$corpus" > "$out/corpus.txt"
  "$bin" prepare --data "$out/corpus.txt" --out "$out/prep-char" --quiet > "$out/prepare-char.txt" 2>&1
  "$bin" prepare --data "$out/corpus.txt" --out "$out/prep-bpe" --set tokenizer.kind=\"bpe\" \
    --set tokenizer.vocab_size=512 --quiet > "$out/prepare-bpe.txt" 2>&1
  echo "outputs in $out"
}

# Tensor name → sha256 of its dtype, shape and bytes, for every .safetensors file under a folder.
tensors() {
  python3 - "$1" <<'EOF'
import hashlib, json, os, struct, sys
root = sys.argv[1]
for dirpath, _, names in sorted(os.walk(root)):
    for n in sorted(names):
        if not n.endswith('.safetensors'): continue
        p = os.path.join(dirpath, n)
        raw = open(p, 'rb').read()
        k = struct.unpack('<Q', raw[:8])[0]
        head = json.loads(raw[8:8 + k]); data = raw[8 + k:]
        for name in sorted(x for x in head if x != '__metadata__'):
            t = head[name]; a, b = t['data_offsets']
            h = hashlib.sha256(data[a:b]).hexdigest()[:16]
            print(os.path.relpath(p, root), name, t['dtype'], t['shape'], h)
        meta = head.get('__metadata__') or {}
        for key in sorted(meta):
            print(os.path.relpath(p, root), '__metadata__', key, meta[key])
EOF
}

# Every other file, its times, durations, dates and the output folder's own path blanked;
# binary files (token shards, images) by their sha256.
texts() {
  local root
  root=$(realpath "$1")
  (cd "$root" && find . -type f ! -name '*.safetensors' ! -name '*.lock' | sort | while read -r f; do
    printf '== %s\n' "$(sed -E 's/data-[0-9]+/data-N/' <<< "$f")"
    case "$f" in
      *.bin|*.png) sha256sum < "$f" ;;
      *metrics.csv) cut -d, -f1-4 "$f" ;;  # tokens_per_s and elapsed_s are times
      *) sed -E "s#$root#OUT#g; s/data-[0-9]+/data-N/g; s/[0-9.]+ ?(ms|s|µs|tok\/s|tokens\/s)\b/T/g;
                 s/\"(elapsed|seconds|time|wall|ms|when|created|started|modified|tok_per_s|tokens_per_s)[a-z_]*\": ?[0-9.e+-]+/\"\1\": T/g;
                 s/[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9:.Z+-]+/DATE/g" "$f" | LC_ALL=C tr -c '\n[:print:]' '?' ;;
    esac
  done)
}

compare() {
  local a=$1 b=$2 bad=0
  diff <(tensors "$a") <(tensors "$b") > /tmp/same-bits-tensors.diff && echo "tensors: same" \
    || { echo "tensors: DIFFER (/tmp/same-bits-tensors.diff)"; bad=1; }
  diff <(texts "$a") <(texts "$b") > /tmp/same-bits-texts.diff && echo "outputs: same" \
    || { echo "outputs: DIFFER (/tmp/same-bits-texts.diff)"; bad=1; }
  echo "$(tensors "$a" | wc -l) tensor lines, $(cd "$a" && find . -type f | wc -l) files compared"
  return $bad
}

case "${1:-}" in
  run) run "$2" "$3" ;;
  compare) compare "$2" "$3" ;;
  *) echo "usage: dev/same-bits.sh run BINARY OUT | compare OUT_A OUT_B" >&2; exit 2 ;;
esac
