#!/usr/bin/env bash
# Every benchmark, sized for the machine at hand: the full sizes on a GPU, small ones on a CPU.
#   bash benchmarks/run_all.sh            # results under benchmarks/results/*.json
# On a GPU the figures for the issue's targets come first and torch.compile last (meant to fit one
# 10-minute device call; estimated, not yet timed on a GPU).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" train_step.py --amp bf16 fp16 fp32 --channels-last 0 1 --compile 0
  "$PY" description2embedding.py --n 100000 --encoder rn50
  "$PY" generate_descriptions.py --model 2b --images 256 --batch 32 --new-tokens 128 --workers 8
  "$PY" input_pipeline.py --images 512
  "$PY" embedding_memory.py
  "$PY" embedding_memory.py --released --json results/embedding_memory_released.json
  "$PY" stop_agreement.py
  "$PY" alignment_losses.py --backbone-batch 256 --repeats 5
  "$PY" long_text.py
  "$PY" vlm_preprocess.py --size 500x375 --size 2000x1500
  "$PY" descriptions_1m.py --root "$(mktemp -d)/d1m"
  "$PY" checkpoint_bytes.py
  "$PY" train_step.py --amp bf16 --channels-last 1 --compile 0 1 --json results/train_step_compile.json
else
  "$PY" train_step.py --batch 8 --steps 3 --warmup 1 --amp fp32 --json results/train_step_cpu.json
  "$PY" input_pipeline.py --images 128 --workers 0 1 2 --json results/input_pipeline_cpu.json
  "$PY" description2embedding.py --n 20000 --encoder tiny --json results/description2embedding_cpu_tiny.json
  "$PY" generate_descriptions.py --images 256 --json results/generate_descriptions_cpu_tiny.json
  "$PY" embedding_memory.py
  "$PY" embedding_memory.py --released --json results/embedding_memory_released.json
  "$PY" stop_agreement.py
  OMP_NUM_THREADS=1 "$PY" alignment_losses.py
  "$PY" long_text.py
  "$PY" vlm_preprocess.py --images 48
  "$PY" descriptions_1m.py --root "$(mktemp -d)/d1m"
  "$PY" checkpoint_bytes.py
fi
