"""Recipes: an ordered list of step configs plus the calibration and evaluation settings, read from
YAML and validated before anything runs.

    calib: {source: c4, samples: 128, seqlen: 512, seed: 0}
    steps:
      - prune: {method: sparsegpt, sparsity: 0.5, pattern: "2:4"}
    eval: {data: wikitext2, seqlen: 2048}

A step's kind picks its class from STEPS, and for prune and quantize its `method` picks the
method's class (prune.SparseGpt above). The classes live next to their code and check themselves
when built (config.py); this module maps YAML onto them and checks what spans steps (their order
and combinations). Unknown keys, wrong types and out-of-range values are refused with a message
that names the key (and a close match when there is one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import AddOn, Prune, Quantize, require
from .data import Calib
from .distill import Distill
from .evaluate import Eval
from .hqq import Hqq
from .lowrank import LowRank
from .maskllm import MaskLlm
from .prune import Magnitude, SparseGpt, Wanda
from .quantize import Awq, Gptq, LeanQuant, Rtn
from .rotate import Rotate
from .structured import Structured

# YAML kind -> its class, or {method: class} with the default method first; the order of the kinds
# is the order steps must come in
STEPS: dict[str, type | dict[str, type]] = {
    "rotate": Rotate,
    "structured": Structured,
    "prune": {"wanda": Wanda, "magnitude": Magnitude, "sparsegpt": SparseGpt, "maskllm": MaskLlm},
    "lowrank": LowRank,
    "quantize": {"gptq": Gptq, "rtn": Rtn, "awq": Awq, "leanquant": LeanQuant, "hqq": Hqq},
    "distill": Distill,
}
ORDER_RULE = ("steps must come in the order rotate, structured, prune, lowrank, quantize, distill (the rotation "
              "is folded in first, units are removed next; quantization is the last step on a Linear; distillation "
              "trains what they left)")

Step = Rotate | Structured | Prune | LowRank | Quantize | Distill


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    calib: Calib = field(default_factory=Calib)
    eval: Eval = field(default_factory=Eval)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def needs(self) -> set[str]:
        return set().union(*(s.needs for s in self.steps))

    @property
    def needs_data(self) -> bool:
        """Whether calibration text is read: for input statistics, or to plan a non-uniform budget."""
        return (bool(self.needs) or any(s.allocation not in ("uniform", "lamp") for s in self.steps)
                or any(getattr(s, "needs_data", False) for s in self.steps))

    @property
    def distill(self) -> Distill | None:
        """The distill step, if the recipe has one (it is the last)."""
        return next((s for s in self.steps if isinstance(s, Distill)), None)

    def validate(self) -> None:
        """What spans steps; each step checked itself when it was built."""
        steps = self.steps
        require(len(steps) > 0, "recipe has no steps")
        for s in steps:
            if type(s) in (Prune, Quantize):
                methods = ", ".join(c.__name__ for c in STEPS[s.kind].values())
                raise ValueError(f"{type(s).__name__} holds what every {s.kind} method shares; build one of its "
                                 f"methods: {methods}")
        kinds = list(STEPS)
        order = [kinds.index(s.kind) for s in steps]
        require(order == sorted(order), ORDER_RULE)
        lowrank = any(isinstance(s, LowRank) for s in steps)
        require(not lowrank or not any(isinstance(s, Awq) for s in steps),
                "quantize method awq cannot follow lowrank (its smoothing pairs are the unfactored Linears); "
                "use rtn or gptq")
        require(not lowrank or not any(isinstance(s, LeanQuant) or getattr(s, "outliers", None) is not None
                                       or getattr(s, "sparse", None) is not None or getattr(s, "guided", None)
                                       is not None for s in steps),
                "quantize method leanquant, outlier_fraction, sparse_fraction and hessian guided cannot follow "
                "lowrank (the factors are stored as plain quantized Linears; guided Hessians belong to the "
                "unfactored ones)")
        require(not lowrank or not any(isinstance(s, Quantize) and s.act is not None for s in steps),
                "quantize.act_bits cannot follow lowrank (activation quantization wraps unfactored Linears)")
        require(sum(isinstance(s, Rotate) for s in steps) <= 1, "a recipe can rotate the model once")
        require(not any(isinstance(s, MaskLlm) for s in steps) or not any(
                    isinstance(s, LowRank) or isinstance(s, Structured) and s.unit != "layers"
                    or isinstance(s, Prune) and not isinstance(s, MaskLlm) for s in steps)
                and sum(isinstance(s, Prune) for s in steps) <= 1,
                "prune method maskllm learns its masks on the whole model before any block is compressed: it "
                "cannot combine with another prune step, lowrank, or structured channels or heads removal")
        require(sum(isinstance(s, Distill) for s in steps) <= 1, "a recipe can have one distill step")
        require(self.distill is None or not any(isinstance(s, Quantize | LowRank) for s in steps),
                "distill trains float weights: it cannot follow quantize (integer codes do not train) or lowrank "
                "(factored Linears); use it after prune, structured or rotate")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides (e.g. "steps.0.sparsity=0.6"), validate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")  # not the locale's encoding: a recipe reads the same everywhere
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe {path} is not UTF-8 text: invalid byte 0x{data[e.start]:02x} "
                         f"at offset {e.start}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return recipe_from_dict(raw if raw is not None else {}, overrides)


def recipe_from_dict(raw: dict, overrides: Sequence[str] = ()) -> Recipe:
    require(isinstance(raw, dict), "a recipe must be a mapping with a 'steps' list")
    raw = _apply_overrides(raw, overrides)
    _check_keys(raw, {"steps", "calib", "eval"}, "recipe")
    steps_raw = raw.get("steps")
    require(isinstance(steps_raw, list), "recipe 'steps' must be a list")
    steps = tuple(_parse_step(i, s) for i, s in enumerate(steps_raw))
    return Recipe(steps=steps, calib=_build(Calib, raw.get("calib") or {}, "calib"),
                  eval=_build(Eval, raw.get("eval") or {}, "eval"))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML; load_recipe of it gives back an equal Recipe."""
    data = {"calib": _plain(recipe.calib), "steps": [{s.kind: _plain(s)} for s in recipe.steps],
            "eval": _plain(recipe.eval)}
    return yaml.safe_dump(data, sort_keys=False)


def _plain(config) -> dict:
    """A config as YAML data: add-ons flattened back into their keys, tuples as lists."""
    out = {"method": config.method} if isinstance(STEPS.get(getattr(config, "kind", None)), dict) else {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, AddOn):
            switch, _, on = value.SWITCH
            if on is not None:
                out[switch] = on
            out.update({key: getattr(value, name) for key, name in value.YAML.items()})
        elif not (value is None and _addon_type(typing.get_type_hints(type(config))[f.name])):
            out[f.name] = value
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _parse_step(i: int, raw: Any) -> Step:
    where = f"steps[{i}]"
    require(isinstance(raw, dict) and len(raw) == 1,
            f"{where} must be a mapping with one key naming its kind ({', '.join(STEPS)})")
    (kind, body), = raw.items()
    if kind not in STEPS:
        raise ValueError(f"{where}: unknown step kind {kind!r}{_did_you_mean(kind, STEPS)}; valid: {', '.join(STEPS)}")
    body, where, cls = body or {}, f"{where}.{kind}", STEPS[kind]
    if isinstance(cls, dict):  # the method picks the class
        require(isinstance(body, dict), f"{where} must be a mapping, got {type(body).__name__}")
        body = dict(body)
        method = _coerce(body.pop("method", next(iter(cls))), Literal[tuple(cls)], f"{where}.method")
        cls, others = cls[method], {m: c for m, c in cls.items() if m != method}
        for key in body:
            takers = [m for m, c in others.items() if key in _yaml_keys(c)]
            require(key in _yaml_keys(cls) or not takers,
                    f"{where}.{key} applies to method {' or '.join(takers)}, not {method}")
    return _build(cls, body, where)


def _addon_type(hint: Any) -> type | None:
    """The add-on class of a field typed `SomeAddOn | None`, else None."""
    args = typing.get_args(hint)
    return next((a for a in args if isinstance(a, type) and issubclass(a, AddOn)), None)


def _yaml_keys(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        addon = _addon_type(hints[f.name])
        keys |= {addon.SWITCH[0], *addon.YAML} if addon else {f.name}
    return keys


def _build(cls: type, raw: Any, where: str):
    require(isinstance(raw, dict), f"{where} must be a mapping, got {type(raw).__name__}")
    _check_keys(raw, _yaml_keys(cls), where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        addon = _addon_type(hints[f.name])
        if addon is not None:
            kwargs[f.name] = _build_addon(addon, raw, where)
        elif f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _build_addon(addon: type, raw: dict, where: str) -> AddOn | None:
    """The add-on from its flat keys in `raw`; None when its switch is off (or absent)."""
    switch, off, on = addon.SWITCH
    hints = typing.get_type_hints(addon)
    value = raw.get(switch, off)
    if on is not None:
        value = _coerce(value, Literal[off, on], f"{where}.{switch}")
    if value == off or (value is None and off is None):
        defaults = {f.name: f.default for f in dataclasses.fields(addon)}
        stray = [k for k, name in addon.YAML.items() if k in raw and k != switch and raw[k] != defaults[name]]
        require(not stray, f"{where}.{stray[0] if stray else ''} needs {switch}{f' {on}' if on else ''}")
        return None
    given = {name: key for key, name in addon.YAML.items() if key in raw}
    return addon(**{name: _coerce(raw[key], hints[name], f"{where}.{key}") for name, key in given.items()})


def _check_keys(raw: dict, valid: set[str], where: str) -> None:
    for key in raw:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}{_did_you_mean(str(key), valid)}; "
                             f"valid keys: {', '.join(sorted(valid))}")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}"
                             f"{_did_you_mean(str(value), map(str, args))}")
        return value
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        require(isinstance(items, list), f"{where} must be a list of {args[0].__name__}, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in items)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{where} must be {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):  # YAML .inf passes one-sided checks such as damp > 0
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return value


def _apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply "a.b.0.c=value" overrides; a step index may skip the step's kind: steps.0.sparsity."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for item in overrides:
        key, sep, text = item.partition("=")
        require(bool(sep) and bool(key), f"override {item!r} must look like key=value")
        value = yaml.safe_load(text)
        parts = key.split(".")
        node: Any = raw
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                require(part.isdigit() and int(part) < len(node), f"override {key}: no index {part}")
                node = node[int(part)]
                if isinstance(node, dict) and len(node) == 1 and parts[j + 1] not in STEPS:
                    node = next(iter(node.values()))  # steps.0.sparsity -> the step's own mapping
            else:
                require(isinstance(node, dict), f"override {key}: {part} is not a mapping")
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            require(last.isdigit() and int(last) < len(node), f"override {key}: no index {last}")
            node[int(last)] = value
        else:
            require(isinstance(node, dict), f"override {key}: cannot set {last}")
            node[last] = value
    return raw
