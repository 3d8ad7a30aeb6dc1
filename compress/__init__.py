"""compress: LLM compression driven by importance scores.

    model, tok = load_model("path/or/model.gguf")
    recipe = load_recipe("recipes/sparsegpt-50.yaml")
    report = compress_(model, recipe, calibration_batches(tok, recipe.calib, model))
    save(model, tok, "out/", recipe=recipe)
"""

from .apply import Report, compress_
from .data import calibration_batches, load_tokens
from .evaluate import perplexity
from .io import load, save
from .model import load_model
from .recipe import Calib, Eval, LowRank, Prune, Quantize, Recipe, Structured, load_recipe

__all__ = [
    "Calib", "Eval", "LowRank", "Prune", "Quantize", "Recipe", "Report", "Structured", "calibration_batches",
    "compress_", "load",
    "load_model", "load_recipe", "load_tokens", "perplexity", "save",
]
__version__ = "0.1.0"
