#!/usr/bin/env bash
# Speed within noise: `tinygpt bench` of two binaries, interleaved (A B A B …) so that both see
# the same machine state, on a config's fused and reference engines. Prints one line per run
# and the medians of each binary's median step, generation speed and sgemm.
#
#   dev/bench-pair.sh /tmp/before target/release/tinygpt [ROUNDS=3] [ITERS=300] [CONFIG]
set -euo pipefail
a=$1 b=$2 rounds=${3:-3} iters=${4:-300} config=${5:-configs/shakespeare-char.toml}
cd "$(dirname "$0")/.."
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  for who in A B; do
    bin=$a; [ "$who" = B ] && bin=$b
    "$bin" bench --config "$config" --iters "$iters" --warmup 10 --gen-tokens 500 --json \
      > "$out/$who-$r.json" 2>/dev/null
    python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(sys.argv[2], 'round', sys.argv[3], '%.2f ms/iter' % j['train_ms_per_iter'], '%.0f tok/s generate' % j['generate_tokens_per_s'], 'sgemm %.0f GFLOP/s' % j['sgemm_gflops'])" "$out/$who-$r.json" "$who" "$r"
  done
done
python3 - "$out" <<'PY'
import glob, json, statistics, sys
for who in "AB":
    js = [json.load(open(f)) for f in sorted(glob.glob(f"{sys.argv[1]}/{who}-*.json"))]
    med = lambda k: statistics.median(j[k] for j in js)
    print(f"{who}: median step {med('train_ms_per_iter'):.2f} ms, generate {med('generate_tokens_per_s'):.0f} tok/s, sgemm {med('sgemm_gflops'):.0f} GFLOP/s ({len(js)} runs)")
PY
