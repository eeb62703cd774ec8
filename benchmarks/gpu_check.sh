#!/usr/bin/env bash
# The prepared GPU check: bf16 + torch.compile, as a GPU runs the scripts by default. One command, about 8 minutes
# on one H200. It needs no network: the packages a GPU image may lack come as wheels carried beside the checkout.
#
#   pip download --no-deps -d benchmarks/wheels tyro docstring-parser typeguard vaderSentiment "transformers>=5.24,<6"
#   bash benchmarks/gpu_check.sh [OUT]                                                            # on the GPU
#
# 1. each script's training step on a random Llama of ~0.5B parameters (hidden 1024, 24 layers) in bf16 with
#    compile: tokens/s, model FLOP/s against the measured matmul peak, SFT's MFU against the GPU's dense bf16
#    peak, peak memory, and PPO's sampling speed and share of the step (benchmarks/bench.py);
# 2. the offline world's pipeline end to end with capped steps, each script's eval.json printed;
# 3. the same under `torchrun --nproc_per_node 1` (FSDP2, sharded checkpoints, gathered sampling), fewer steps.
# On a machine without CUDA it runs the same commands on the CPU, smaller (the dry run: `DRY_RUN=1`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

missing=$($PY - <<'EOF'  # what the image lacks: tyro, vaderSentiment, transformers >= 5.24 (requirements.txt)
import importlib.metadata, importlib.util
missing = [m for m in ("tyro", "vaderSentiment") if importlib.util.find_spec(m) is None]
version = tuple(int(x) for x in importlib.metadata.version("transformers").split(".")[:2])
print(" ".join(missing + ["transformers>=5.24,<6"] * (version < (5, 24))))
EOF
)
if [ -n "$missing" ]; then
    [ -d benchmarks/wheels ] || { echo "error: $missing missing and no benchmarks/wheels to install from" >&2; exit 1; }
    $PY -m pip install -q --no-index --find-links benchmarks/wheels $missing
fi
$PY - <<'EOF'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
EOF

if [ "${DRY_RUN:-0}" = 1 ]; then  # the CPU: a small model, few steps, the GPU's settings asked for explicitly
    size="--hidden_size 128 --num_layers 2 --steps 16" steps=4 extra="--bf16 True --compile True"
else
    size="--hidden_size 1024 --num_layers 24 --steps 20" steps=60 extra=""
fi

echo "== 1. training steps: bench.py $size $extra"
$PY benchmarks/bench.py --world data/world $size --runs 1 --out "$OUT/bench/results.jsonl" \
    --scripts sft reward dpo ppo_epochs1 ppo_epochs4 --extra="$extra" > "$OUT/bench.log" 2>&1 \
    || { tail -30 "$OUT/bench.log"; exit 1; }
grep -v '^{' "$OUT/bench.log" | tail -12

echo "== 2. the pipeline on the offline world, $steps steps each (rollout batches for ppo, rloo and rlaif)"
LAUNCH=$PY
run() {  # name, script, then its arguments; print the final evaluation
    local name=$1 start=$SECONDS; shift
    $LAUNCH "$@" $extra --output_dir "$OUT/runs/$name" > "$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log"; exit 1; }
    echo "$name: $((SECONDS - start)) s"
    $PY -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1])), indent=None))" "$OUT/runs/$name/eval.json"
}
rm -rf "$OUT/runs"
run sft sft.py --max_steps $((steps * 3)) --num_eval_prompts 64
run reward reward.py --model_name_or_path "$OUT/runs/sft" --max_steps "$steps" --num_normalisation_rows 256
run ppo ppo.py --model_name_or_path "$OUT/runs/sft" --reward_model_name_or_path "$OUT/runs/reward" \
    --max_steps $((steps / 4)) --num_eval_prompts 64
run rloo rloo.py --model_name_or_path "$OUT/runs/sft" --reward_model_name_or_path "$OUT/runs/reward" \
    --max_steps $((steps / 4)) --num_eval_prompts 64
run dpo dpo.py --model_name_or_path "$OUT/runs/sft" --max_steps "$steps" --num_eval_prompts 64
run rlaif rlaif.py --model_name_or_path "$OUT/runs/sft" --max_steps $((steps / 4)) --num_eval_prompts 64

echo "== 3. every script under torchrun --nproc_per_node 1 (FSDP2), a checkpoint each, from the models of 2."
LAUNCH="$PY -m torch.distributed.run --standalone --nproc_per_node 1"
fsdp="--max_steps $((steps / 6 + 2)) --save_every $((steps / 12 + 1))" prompts="--num_eval_prompts 32"
run fsdp_sft sft.py $fsdp $prompts
run fsdp_reward reward.py --model_name_or_path "$OUT/runs/sft" $fsdp --num_normalisation_rows 64
run fsdp_ppo ppo.py --model_name_or_path "$OUT/runs/sft" --reward_model_name_or_path "$OUT/runs/reward" $fsdp $prompts
run fsdp_rloo rloo.py --model_name_or_path "$OUT/runs/sft" --reward_model_name_or_path "$OUT/runs/reward" $fsdp $prompts
run fsdp_dpo dpo.py --model_name_or_path "$OUT/runs/sft" $fsdp $prompts
run fsdp_rlaif rlaif.py --model_name_or_path "$OUT/runs/sft" $fsdp $prompts
echo "== done: $OUT"
