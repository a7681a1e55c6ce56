#!/usr/bin/env bash
# Re-measures issue 15's AOT memory figures: Llama-2-7B on v5p-64 (FSDP 32, 128 × 4,096 tokens,
# remat full, scanned layers, bf16 compute, f32 params), compiled from this CPU with libtpu
# (2–4 min each on the shared 2 cores). Extra flags are passed on and win over these, e.g.
#   tools/aot_llama7b.sh flash|xla [FLAGS...]
#   tools/aot_llama7b.sh xla --config.loss_chunk=0 --config.model.attention_chunk=0   # as before
#   tools/aot_llama7b.sh flash --config.batch_size=16 --config.model.block_size=32768 \
#     --config.mesh.fsdp=16 --config.mesh.tensor=2 --config.model.remat=save_dots  # long context
set -euo pipefail
attention=${1:?flash or xla}; shift
exec bigflax aot --config experiments/preset.py:llama2_7b --topology v5p-64 \
  --config.batch_size=128 --config.mesh.data=1 --config.mesh.fsdp=-1 \
  --config.model.scan_layers=True --config.model.remat=full \
  --config.model.attention="$attention" "$@"
