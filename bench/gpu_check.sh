#!/usr/bin/env bash
# One command for a lent GPU (H200): engine tests on CUDA, then the quick benchmark on CUDA (SD1.5 fp16, Flux bf16).
# Usage: bash bench/gpu_check.sh        (results under $OUT when set, else bench/results; < 10 minutes)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/gpu.txt" 2>&1 || true
# tests first: they take seconds and tell whether the CUDA fast paths are exact
timeout 100 "$PY" -m pytest -q tests/test_engine.py tests/test_engine_batches.py 2>&1 | tee "$OUTDIR/test_engine_cuda.txt" | tail -5
tests_rc=${PIPESTATUS[0]}
# the GPU bench: SD1.5, ranks 8/32, 1 and 4 LoRAs, all implementations plus the engine without same-shape
# batching (the A/B of the batched path), CUDA-event timing
timeout 300 "$PY" -m bench --device cuda --quick --impls core,nodes,engine,engine-perweight,lorapatcher,diffusers \
  --out "$OUTDIR" 2>&1 | grep -v -i "warning\|autocast" \
  | tee "$OUTDIR/bench_cuda.log" | tail -30
bench_rc=${PIPESTATUS[0]}
# Flux.1 at full width (bf16), the CPU case's 2 double + 4 single blocks: kohya and diffusers-named rank-32 LoRAs
# (fused qkv / linear1 rows) through core, nodes and the engine (batched and per weight), and the engine's
# per-weight overhead on Flux.1-dev's full block layout; its own process, so a failure keeps the SD results
timeout 120 "$PY" -m bench --device cuda --quick --arch flux --impls core,nodes,engine,engine-perweight \
  --out "$OUTDIR" 2>&1 | grep -v -i "warning\|autocast" \
  | tee "$OUTDIR/bench_flux_cuda.log" | tail -24
flux_rc=${PIPESTATUS[0]}
# a strength change on ComfyUI's real load path on the GPU: how much of it is the model's move off and back;
# core vs merged nodes vs live mode (strength and block changes, first-in-process and warm), and live mode's
# per-step cost at ranks 8/32/128 and a 4-LoRA stack (--steps, 64x64 latent)
timeout 150 "$PY" -m bench.strength_change --device cuda --repeat 2 --steps --attribution 2>&1 \
  | grep -v -i "warning\|autocast" | tee "$OUTDIR/strength_change_cuda.md" | tail -24
change_rc=${PIPESTATUS[0]}
# the same on the full-width DiT (Flux.1, 2 double + 4 single blocks, fp16)
timeout 120 "$PY" -m bench.strength_change --device cuda --arch flux --repeat 2 --steps 2>&1 \
  | grep -v -i "warning\|autocast" | tee "$OUTDIR/strength_change_flux_cuda.md" | tail -22
live_flux_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc flux rc=$flux_rc strength_change rc=$change_rc live flux rc=$live_flux_rc (results in $OUTDIR)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$flux_rc" -eq 0 ] && [ "$change_rc" -eq 0 ] && [ "$live_flux_rc" -eq 0 ]
