#!/usr/bin/env bash
# Draw the banks of issue 9's prompt x strategy and think / no-think parts, one at a time.
#
#   nohup nice -n 10 scripts/draw_joint_banks.sh MODEL.gguf > runs/draw_joint_banks.log 2>&1 &
#
# llama.cpp processes on a small machine slow each other badly, so each draw waits until no other
# bank draw (`apportion bench --dataset ...`) is running. A bank that already exists is resumed,
# so the script can be started again after an interruption. Each draw logs to runs/<name>.log.
# Set WAIT_FOR to a file that must exist before the prompt-mode draws start (they need
# `apportion bench --prompt-mode`).
set -u
MODEL=${1:?usage: draw_joint_banks.sh MODEL.gguf}
cd "$(dirname "$0")/.."
. .venv/bin/activate

wait_for_quiet() {
    while pgrep -f "apportion bench .*(--model-path|--dataset)" > /dev/null; do sleep 30; done
}

draw() {  # name, then the grid's options
    local name=$1; shift
    local resume=()
    if [ -f "runs/$name/summary.json" ]; then echo "runs/$name is done"; return 0; fi
    [ -f "runs/$name/bank.jsonl" ] && resume=(--resume)
    wait_for_quiet
    echo "$(date -u +%FT%TZ) drawing runs/$name"
    apportion bench --model-path "$MODEL" --dataset mawps_singleop --limit 100 --budgets 1,2,4,8 \
        --algorithms self-consistency --orders 5 --out "runs/$name" "${resume[@]}" "$@" > "runs/$name.log" 2>&1
    echo "$(date -u +%FT%TZ) runs/$name exited with $?"
}

draw qwen-direct100 --max-tokens 24 --system-prompt "Give only the final answer, as 'The answer is N'."
if [ -n "${WAIT_FOR:-}" ]; then
    while [ ! -e "$WAIT_FOR" ]; do sleep 30; done
fi
draw qwen-cod100 --max-tokens 256 --prompt-mode cod
draw qwen-tale100 --max-tokens 256 --prompt-mode tale
