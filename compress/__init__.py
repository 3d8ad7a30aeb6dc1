"""compress: LLM compression driven by importance scores.

    model, tok = load_model("path/or/model.gguf")
    recipe = load_recipe("recipes/sparsegpt-50.yaml")
    report = compress_(model, recipe, calibration_batches(tok, recipe.calib, model))
    save(model, tok, "out/", recipe=recipe)

or one method's config instead of a recipe: compress_(model, Gptq(bits=4, group_size=128), batches).
"""

from .apply import Report, compress_
from .config import ActQuant, BitBudget, DenseAndSparse, Guided, Outliers, Prune, Quantize
from .data import Calib, calibration_batches, load_tokens
from .distill import Distill
from .evaluate import Eval, perplexity
from .hqq import Hqq
from .loading import load
from .lowrank import LowRank
from .maskllm import MaskLlm
from .model import load_model
from .prune import Magnitude, SparseGpt, Wanda
from .quantize import Awq, Gptq, LeanQuant, Rtn
from .recipe import Recipe, load_recipe
from .rotate import Rotate
from .saving import save
from .structured import Structured

__all__ = [
    "ActQuant", "Awq", "BitBudget", "Calib", "DenseAndSparse", "Distill", "Eval", "Gptq", "Guided", "Hqq", "LeanQuant",
    "LowRank", "Magnitude", "MaskLlm", "Outliers", "Prune", "Quantize", "Recipe", "Report", "Rotate", "Rtn",
    "SparseGpt", "Structured", "Wanda", "calibration_batches", "compress_", "load", "load_model", "load_recipe",
    "load_tokens", "perplexity", "save",
]
__version__ = "0.1.0"
