#!/usr/bin/env python3
"""The scaling estimate of docs/distributed.md, from dev/measure-distributed.sh's reports.

    python3 dev/scaling.py OUT        # OUT: the folder measure-distributed.sh wrote

Measured (this machine): the compute of one micro-batch on one core (the 2-rank runs, minus
their all-reduce), and the all-reduce of each model's gradients between 2 ranks over TCP on
loopback. Assumed: per-message latency and bandwidth of 10 and 100 Gb/s links (below).

A step of A micro-batches on N ranks of one core each takes (A/N)·c + r(N), where c is one
micro-batch's compute and r(N) the butterfly all-reduce of 4·P bytes:
    r(N) = 2·log2(N)·latency + 2·(N−1)/N · 4P · (1/bandwidth + cpu)
with `cpu` the per-byte cost of the 2-rank all-reduce measured over TCP on loopback (the
copies through the kernel and the adds, all on this machine's cores: an upper bound).
Speed-up = A·c / ((A/N)·c + r(N)); efficiency = speed-up / N. Printed twice: for ranks of one
core like this machine's, and for ranks of 16 such cores, taken as 16 times faster (no thread
ever scales that well, so the network's share there is an upper bound).
"""
import json
import math
import sys

out = sys.argv[1]


def load(name):
    with open(f"{out}/{name}.json") as f:
        return json.load(f)


A = 64  # micro-batches a step (the global batch), the same for every N
links = {
    # name: (latency per exchange in s, bytes/s); TCP on 10 GbE, RDMA on 100 Gb/s.
    "10 Gb/s": (30e-6, 10e9 / 8 * 0.9),
    "100 Gb/s": (5e-6, 100e9 / 8 * 0.9),
}
rows = []
for label, two, one_thread in [
    ("baby (0.8M), 12×64 tokens", "baby-2x1", None),
    ("10.7M, 2×256 tokens", "10m-2x1", None),
    ("GPT-2-124M, 1×1024 tokens", None, "gpt2-124m-1x1"),
]:
    if two:
        r = load(two)
        per_rank = 4 // r["ranks"]  # the measurement's grad_accum_steps = 4
        step = r["train_ms_per_iter"] / 1e3
        c = step * (1 - r["allreduce_share"]) / per_rank
    else:
        r = load(one_thread)
        c = r["train_ms_per_iter"] / 1e3
    rows.append((label, r["parameters"], c))

tcp = {}
for name in ["baby-2x1-tcp", "10m-2x1-tcp"]:
    r = load(name)
    tcp[r["parameters"]] = r["train_ms_per_iter"] / 1e3 * r["allreduce_share"]
# Loopback: a line through the two measured points (seconds = a + bytes·b).
(p1, t1), (p2, t2) = sorted(tcp.items())
b = (t2 - t1) / (4 * (p2 - p1))
a = max(t1 - 4 * p1 * b, 0.0)
print(f"loopback TCP, 2 ranks: {a*1e3:.2f} ms + {1/b/1e9:.2f} GB/s "
      f"(baby {t1*1e3:.1f} ms, 10.7M {t2*1e3:.1f} ms a step)")

for cores in [1, 16]:
    print()
    print(f"Ranks of {cores} core{'s' if cores > 1 else ''}, {A} micro-batches a step:")
    print()
    print("| model, micro-batch | compute / micro-batch | link | " +
          " | ".join(f"N={n}" for n in [2, 4, 8, 16, 32, 64]) + " |")
    print("|---|---|---|" + "---|" * 6)
    for label, params, c1 in rows:
        c = c1 / cores
        nbytes = 4 * params
        for link, (lat, bw) in links.items():
            cells = []
            for n in [2, 4, 8, 16, 32, 64]:
                r = 2 * math.log2(n) * lat + 2 * (n - 1) / n * nbytes * (1 / bw + b)
                sp = A * c / (A / n * c + r)
                cells.append(f"{sp:.1f}× ({100*sp/n:.0f}%)")
            print(f"| {label} | {c*1e3:.0f} ms | {link} | " + " | ".join(cells) + " |")
