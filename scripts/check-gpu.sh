#!/usr/bin/env bash
# The GPU measurements of tinygpt, in one run on a machine with an NVIDIA GPU, its driver and
# PyTorch (with NVIDIA's CUDA 13 library wheels), after scripts/prepare-gpu-check.sh made .gpu/
# on the build machine. Results go to $OUT (default ./gpu-results):
#   summary.md     the three measurements, with the command behind each
#   log.txt        everything the commands printed
#   bench-*.json   `tinygpt bench` on the GPU in f32, tf32 and bf16
#   nanogpt.txt    nanoGPT's train.py on the same GPU: ms/iter with and without torch.compile
#
#   scripts/check-gpu.sh                 # everything (about 6 minutes on an H200)
#   DEVICE=cpu ITERS=1 WARMUP=0 scripts/check-gpu.sh   # a dry run of the script's own logic on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
log="$OUT/log.txt"
summary="$OUT/summary.md"
: >"$log"
say() { echo "$*" | tee -a "$summary"; }
run() { echo "+ $*" >>"$log"; "$@" >>"$log" 2>&1; }
corpus=.gpu/tinyshakespeare.txt
[ -f .gpu/tinygpt.gz ] || { echo "check-gpu: no .gpu/tinygpt.gz; run scripts/prepare-gpu-check.sh on the build machine and carry .gpu" >&2; exit 1; }
bin=$(mktemp -d)/tinygpt
gunzip -c .gpu/tinygpt.gz >"$bin" && chmod +x "$bin"

# The CUDA libraries the binary links (cuBLAS, cuRAND, NVRTC, the runtime): PyTorch's wheels.
if [ "$DEVICE" != cpu ]; then
    nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0] + "/"))' 2>/dev/null || true)
    if [ -n "$nv" ]; then
        LD_LIBRARY_PATH=$(find "$nv" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
        export LD_LIBRARY_PATH
    fi
    nvidia-smi >>"$log" 2>&1
fi
: >"$summary"
say "# tinygpt on $( [ "$DEVICE" = cpu ] && echo "the CPU (dry run)" || nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n1)"
say ""
say "$(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), \`$bin bench\` sgemm: $($bin bench --config configs/tiny.toml --data $corpus --iters 1 --warmup 0 --gen-tokens 1 --device cpu --json 2>/dev/null | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["sgemm_gflops"]), "GFLOP/s (CPU)")' 2>/dev/null)"

# 1. Correctness: 20 steps of the small config on the device and on the CPU (reference engine,
# dropout off: only the arithmetic differs), then the device's checkpoint resumed on the CPU.
tmp=$(mktemp -d)
small=(--config configs/shakespeare-char.toml --data "$corpus" --engine reference --quiet
    --set model.dropout=0.0 --set training.max_iters=20 --set training.warmup_iters=5
    --set training.lr_decay_iters=25 --set training.eval_interval=20
    --set training.checkpoint_interval=20 --set training.eval_iters=5 --sample-tokens 0)
run "$bin" train "${small[@]}" --device cpu --out "$tmp/cpu"
run "$bin" train "${small[@]}" --device "$DEVICE" --out "$tmp/dev"
run "$bin" train --resume "$tmp/dev" --device cpu --quiet --sample-tokens 0 --set training.max_iters=25
resumed=$?
say ""
say "## 1. Correctness: 20 steps on $DEVICE vs cpu, f32"
python3 - "$tmp/cpu/metrics.csv" "$tmp/dev/metrics.csv" <<'EOF' | tee -a "$summary"
import csv, sys
try:
    rows = [{r["step"]: float(r["train_loss"]) for r in csv.DictReader(open(p)) if r["train_loss"]} for p in sys.argv[1:]]
except OSError as e:
    sys.exit(print(f"- FAIL: a run did not finish ({e}); see log.txt"))
steps = [s for s in rows[0] if s in rows[1] and s != "0"]
worst = max(abs(rows[0][s] - rows[1][s]) for s in steps)
print(f"- {len(steps)} steps compared; largest train-loss difference {worst:.2e} (step 20: cpu {rows[0]['20']:.6f}, device {rows[1]['20']:.6f}): {'PASS' if worst < 2e-4 else 'FAIL'} (bar 2e-4)")
EOF
say "- the device's checkpoint resumed on the CPU for 5 more steps: $([ $resumed = 0 ] && echo PASS || echo FAIL)"
say "- command: \`tinygpt train --config configs/shakespeare-char.toml --engine reference --set model.dropout=0.0 --set training.max_iters=20 --device cpu|$DEVICE\`, then \`tinygpt train --resume RUN --device cpu --set training.max_iters=25\`"

# 2. Speed: nanoGPT's shakespeare_char model (10.7M), tinygpt's bench against nanoGPT's train.py.
say ""
say "## 2. Speed: configs/shakespeare-char-10m.toml (nanoGPT's train_shakespeare_char), ms/iter"
say ""
say "| trainer | dtype | ms/iter (median) | tokens/s | peak GPU memory | MFU |"
say "|---|---|---|---|---|---|"
for dt in f32 tf32 bf16; do
    echo "+ tinygpt bench --dtype $dt" >>"$log"
    "$bin" bench --config configs/shakespeare-char-10m.toml --data "$corpus" --device "$DEVICE" \
        --dtype "$dt" --iters "${ITERS:-100}" --warmup "${WARMUP:-10}" --gen-tokens 200 --json >"$OUT/bench-$dt.json" 2>>"$log"
    python3 - "$OUT/bench-$dt.json" <<'EOF' | tee -a "$summary"
import json, sys
try:
    b = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"| tinygpt | ? | failed: see log.txt | | | |"); sys.exit()
mem = f"{b['peak_device_memory_mb']:.0f} MB" if b.get("peak_device_memory_mb") else "-"
mfu = f"{100 * b['mfu']:.1f}%" if b.get("mfu") else "-"
print(f"| tinygpt ({b['engine']}) | {b['dtype']} | {b['train_ms_per_iter']:.1f} | {b['train_tokens_per_s']:.0f} | {mem} | {mfu} |  gen {b['generate_tokens_per_s']:.0f} tok/s")
EOF
    [ "$DEVICE" = cpu ] && break
done
if [ "$DEVICE" != cpu ] && [ -f .gpu/nanoGPT/train.py ]; then
    : >"$OUT/nanogpt.txt"
    for dtype in float32 bfloat16; do
        for compile in False True; do
            echo "### nanoGPT dtype=$dtype compile=$compile" >>"$OUT/nanogpt.txt"
            (cd .gpu/nanoGPT && timeout 300 python3 train.py config/train_shakespeare_char.py \
                --dtype=$dtype --compile=$compile --max_iters=200 --eval_interval=100000 \
                --eval_iters=1 --log_interval=1 --always_save_checkpoint=False \
                --out_dir=/tmp/nanogpt-out) >>"$OUT/nanogpt.txt" 2>&1
            python3 - "$OUT/nanogpt.txt" "$dtype" "$compile" <<'EOF' | tee -a "$summary"
import re, statistics, sys
text = open(sys.argv[1]).read().split("### nanoGPT")[-1]
ms = [float(m.group(2)) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", text) if int(m.group(1)) >= 20]
name = {"float32": "f32 (TF32 products)", "bfloat16": "bf16"}[sys.argv[2]]
comp = "torch.compile" if sys.argv[3] == "True" else "eager"
if ms:
    med = statistics.median(ms)
    print(f"| nanoGPT ({comp}) | {name} | {med:.1f} | {64 * 256 / med * 1000:.0f} | | |")
else:
    print(f"| nanoGPT ({comp}) | {name} | failed: see nanogpt.txt | | | |")
EOF
        done
    done
fi
say ""
say "- tinygpt: \`tinygpt bench --config configs/shakespeare-char-10m.toml --data tinyshakespeare.txt --device cuda --dtype f32|tf32|bf16 --iters 100 --warmup 10\`; nanoGPT: \`python train.py config/train_shakespeare_char.py --dtype=float32|bfloat16 --compile=False|True --max_iters=200 --log_interval=1\` (median of iters 20–199; its float32 runs products on TF32, as train.py allows)"

# 3. Quality per second: the GPU recipe to whole-split val <= 1.47 in <= 60 s of training.
if [ "$DEVICE" != cpu ]; then
    say ""
    say "## 3. Quality per second: configs/shakespeare-char-10m-h200.toml"
    start=$(date +%s.%N)
    run "$bin" train --config configs/shakespeare-char-10m-h200.toml --data "$corpus" \
        --device "$DEVICE" --out "$tmp/quality" --quiet --sample-tokens 0
    wall=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
    train_s=$(python3 -c "import csv; r=list(csv.DictReader(open('$tmp/quality/metrics.csv'))); print(r[-1]['elapsed_s'])" 2>/dev/null)
    "$bin" eval --checkpoint "$tmp/quality/last" --data "$corpus" --device "$DEVICE" --json >"$tmp/eval.json" 2>>"$log"
    cat "$tmp/eval.json" >>"$log"
    val=$(python3 -c "import json; print(round(json.load(open('$tmp/eval.json'))['loss'], 4))" 2>/dev/null)
    say "- whole-split val loss ${val:-?} after ${train_s:-?} s of training (${wall} s wall with evaluation and checkpoints); goal ≤ 1.47 in ≤ 60 s"
    say "- command: \`tinygpt train --config configs/shakespeare-char-10m-h200.toml --device cuda\`, then \`tinygpt eval --checkpoint RUN/last --json\`"
fi
rm -rf "$tmp"
echo "check-gpu: results in $OUT"
