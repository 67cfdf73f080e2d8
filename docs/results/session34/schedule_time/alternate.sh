#!/bin/bash
# alternate old (b = ae11402) and new (a = working tree) benchmark runs
mkdir -p /tmp/s34a/bench5
for k in 1 2 3; do
  for v in b a; do
    (cd /work/wt34$v && PYTHONPATH=/tmp/p$v /work/main/.venv/bin/python benchmarks/schedule_time.py --pooled 100000 --cycles 2000 --starvation-s 1e9 > /tmp/s34a/bench5/nostarve_${v}_$k.txt 2>&1)
  done
done
for k in 1 2; do
  for v in b a; do
    (cd /work/wt34$v && PYTHONPATH=/tmp/p$v /work/main/.venv/bin/python benchmarks/schedule_time.py > /tmp/s34a/bench5/default_${v}_$k.txt 2>&1)
  done
done
