#!/usr/bin/env bash
# The whole paper evaluation in simulation: the six headline rows, then the sweeps and ablations.
# Run from the repository root: scenarios/paper/run-all.sh [RESULTS_FOLDER] (default results/paper-all).
# Each step prints its own wall time; every command writes its tables and figures under the folder.
set -euo pipefail
out=${1:-results/paper-all}
step() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "== $name: $((SECONDS - t0)) s"; }
step headline    pensieve paper --out "$out/headline" --force
step think-time  pensieve sweep scenarios/paper/think-time.yaml --search --out "$out/think-time" --force
step host-cache  pensieve sweep scenarios/paper/host-cache.yaml --search --out "$out/host-cache" --force
step head-tail   pensieve sweep scenarios/paper/head-vs-tail.yaml --search --baseline lru --out "$out/head-vs-tail" --force
step vs-lru      pensieve sweep scenarios/paper/pensieve-vs-lru.yaml --seeds 5 --baseline lru --out "$out/pensieve-vs-lru" --force
step policies    pensieve sweep scenarios/paper/policies.yaml --baseline pensieve --out "$out/policies" --force
echo "== the whole paper evaluation: $SECONDS s"
