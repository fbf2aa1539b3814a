#!/usr/bin/env bash
# Issue 11's evidence: step-wise searches beside self-consistency and best-of-N with the second
# model (MODELS.md) as policy and judge, on 30 MAWPS SingleOp questions, then 30 Game of 24 puzzles
# with the verifier. Every question is journaled as it finishes, so the script resumes:
#
#   nohup scripts/search_bench.sh MODEL.gguf > runs/search-bench.log 2>&1 &         # first run
#   nohup scripts/search_bench.sh MODEL.gguf --resume > runs/search-bench.log 2>&1 &   # after a stop
#
# About 9 hours on 2 cores. Other llama.cpp work on the machine slows it (and is slowed) badly.
set -u
MODEL=${1:?usage: search_bench.sh MODEL.gguf [--resume]}
RESUME=${2:-}
ALGOS=${ALGOS:-self-consistency,best-of-n,beam-search,dvts,particle-filtering,particle-gibbs,value-tree-search,tree-of-thoughts,debate}
# Game of 24 replies run to the token limit, so each cell there costs several MAWPS cells:
# GAME_BUDGETS=4 halves it when time is short.
GAME_BUDGETS=${GAME_BUDGETS:-4,8}
cd "$(dirname "$0")/.."
.venv/bin/apportion bench --dataset mawps_singleop --limit 30 --live --budgets 4,8 --model-path "$MODEL" \
  --max-tokens 256 --algorithms $ALGOS --process-scorer judge --beam-width 2 --concurrency 4 \
  --out runs/mawps-search $RESUME
# Self-consistency at the searches' token spend (budgets 16 and 32), for `apportion report
# runs/mawps-search runs/mawps-search-wide --out DIR`.
WIDE_RESUME=$RESUME
[ -f runs/mawps-search-wide/live.jsonl ] && WIDE_RESUME=--resume
.venv/bin/apportion bench --dataset mawps_singleop --limit 30 --live --budgets 16,32 --model-path "$MODEL" \
  --max-tokens 256 --algorithms self-consistency --concurrency 4 --out runs/mawps-search-wide $WIDE_RESUME
GAME_RESUME=$RESUME
[ -f runs/game24-search/live.jsonl ] && GAME_RESUME=--resume
.venv/bin/apportion bench --dataset game24 --limit 30 --live --budgets $GAME_BUDGETS --model-path "$MODEL" \
  --max-tokens 256 --algorithms $ALGOS --process-scorer game24 --beam-width 2 --concurrency 4 \
  --out runs/game24-search $GAME_RESUME
