#!/bin/bash
# The per-token wait bound in the simulator: paper-90 OPT-13B, 160 requests, seeds 0-5,
# offline and at 14 req/s; each cell "aligned tok/s / p99 TPOT ms" (thirty-fifth session).
for b in 0 0.003 0.005 0.01 0.02; do
  for rate in offline 14; do
    echo -n "max_pool_wait_per_token_s=$b $rate: "
    for seed in 0 1 2 3 4 5; do
      extra=(); [ "$rate" != offline ] && extra=(--rate "$rate")
      .venv/bin/alignedserve sim --cost-model balanced --seed $seed --workload paper-90 \
        --model-shape opt-13b --num-requests 160 --pool-gib 160 "${extra[@]}" \
        --set aligned.max_pool_wait_per_token_s=$b | awk '/ aligned /{printf "%s/%s ", $4, $8}'
    done
    echo
  done
done
