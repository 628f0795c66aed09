#!/usr/bin/env bash
# The measurements behind docs/distributed.md: one process on every core against N ranks of one
# thread each, the same global batch, timed over ITERS steps with `tinygpt bench`; the all-reduce
# over shared memory and over TCP on loopback; and one step of GPT-2-124M for the estimate.
#
#   cargo build --release --features mpi
#   dev/measure-distributed.sh OUT [ITERS]      # about 30 minutes on 2 cores with ITERS=300
#
# Writes OUT/*.json (bench reports) and prints a line per run; a report already in OUT is kept
# (rerun to finish an interrupted measurement).
set -euo pipefail
out=$1; iters=${2:-300}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/target/release/tinygpt
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
bench() { # NAME NP [mpirun options…] -- bench args…
  local name=$1 np=$2; shift 2
  local mpi=(); while [ "$1" != "--" ]; do mpi+=("$1"); shift; done; shift
  if [ -s "$out/$name.json" ]; then :
  elif [ "$np" = 0 ]; then "$bin" bench --json "$@" > "$out/$name.json"
  else mpirun --oversubscribe --bind-to none -np "$np" "${mpi[@]}" "$bin" bench --json "$@" > "$out/$name.json"; fi
  python3 - "$out/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<28} {r['ranks']} rank(s) x {r['threads']} thr  {r['train_ms_per_iter']:8.1f} ms/iter  "
      f"{r['train_tokens_per_s']:9.0f} tok/s  all-reduce {100*r['allreduce_share']:5.1f}%  "
      f"params {r['parameters']}  sgemm {r['sgemm_gflops']:.0f} GFLOP/s")
PY
}
common=(--iters "$iters" --warmup 10 --gen-tokens 1)
baby=(--config "$here/configs/shakespeare-char.toml" "${common[@]}")
# The 10.7M model with 2 windows of 256 a micro-batch (8 a step): its all-reduce is the same
# 43 MB as at batch 64, its compute 32 times less, so the share the all-reduce takes is an
# upper bound for the config as shipped.
ten=(--config "$here/configs/shakespeare-char-10m.toml" --set training.batch_size=2 "${common[@]}")
for accum in 4; do
  a=(--set "training.grad_accum_steps=$accum")
  bench baby-1x2 0 -- "${baby[@]}" "${a[@]}"
  bench baby-2x1 2 -- "${baby[@]}" "${a[@]}"
  bench baby-4x1 4 -- "${baby[@]}" "${a[@]}"
  bench baby-2x1-tcp 2 --mca btl tcp,self -- "${baby[@]}" "${a[@]}"
  bench 10m-1x2 0 -- "${ten[@]}" "${a[@]}"
  bench 10m-2x1 2 -- "${ten[@]}" "${a[@]}"
  bench 10m-4x1 4 -- "${ten[@]}" "${a[@]}"
done
bench 10m-2x1-tcp 2 --mca btl tcp,self -- --config "$here/configs/shakespeare-char-10m.toml" \
  --set training.batch_size=2 --set training.grad_accum_steps=4 --iters 50 --warmup 5 --gen-tokens 1
# One core, one sequence of 1024 tokens: the compute of a micro-batch on one rank of one core.
RAYON_NUM_THREADS=1 bench gpt2-124m-1x1 0 -- --config "$here/configs/shakespeare-char-10m.toml" --set model.n_layer=12 \
  --set model.n_head=12 --set model.n_embd=768 --set model.block_size=1024 --set 'tokenizer.kind="bpe"' \
  --set tokenizer.vocab_size=50257 --set training.batch_size=1 --iters 3 --warmup 1 --gen-tokens 1
