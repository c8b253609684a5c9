"""`quantize_model`: turn the `nn.Linear`s of any module into `BitLinear`s, in place."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from ..errors import BitNetError
from ..quant.config import QATConfig
from .bitlinear import BitLinear

log = logging.getLogger(__name__)

# BitNet keeps the output head in full precision (embeddings are nn.Embedding, never touched).
DEFAULT_EXCLUDE = ("lm_head",)


@dataclass
class ConversionReport:
    """What `quantize_model` did.

    replaced: names of the modules now BitLinear.
    skipped: (name, reason) for each nn.Linear left alone.
    already: names of modules that were BitLinear before the call.
    """

    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    already: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"replaced {len(self.replaced)} nn.Linear by BitLinear, skipped {len(self.skipped)}, "
            f"{len(self.already)} already BitLinear"
        ]
        lines += [f"  kept {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _matches(name: str, patterns) -> str | None:
    """The first glob in `patterns` matching the dotted `name` or one of its suffixes."""
    for p in patterns:
        if fnmatchcase(name, p) or fnmatchcase(name, "*." + p):
            return p
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """What `model.get_output_embeddings()` returns, or None (also when it raises for a
    model without an output head)."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        # Some transformers models define the method but raise for "no output head".
        return None


def quantize_model(
    model: nn.Module,
    config: QATConfig | None = None,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = None,
) -> ConversionReport:
    """Replace `nn.Linear` submodules of `model` by `BitLinear`, in place, keeping weights.

    Works on any `nn.Module`, Hugging Face `transformers` models included. The new layers
    share the original parameter tensors (same device, dtype, and identity, so an existing
    optimizer still holds them). Patterns are `fnmatch` globs over dotted module names that
    also match any dotted suffix (`"q_proj"` matches `"model.layers.0.self_attn.q_proj"`).

    Args:
        model: the module to convert.
        config: the `QATConfig` for every converted layer (default: BitNet b1.58).
        include: if given, convert only linears matching one of these; an included name
            overrides the default exclusion of the output head.
        exclude: never convert linears matching these.

    By default the output head (`lm_head`, or what `get_output_embeddings()` returns) and any
    linear whose weight is tied to an embedding stay full precision, as in BitNet. Applying
    the function twice changes nothing more. Returns a `ConversionReport`.
    """
    config = config or QATConfig()
    if isinstance(model, nn.Linear):
        raise BitNetError(
            "quantize_model rewrites submodules in place and cannot replace the model itself; "
            "use BitLinear.from_linear(linear, config) for a bare nn.Linear"
        )
    include, exclude = tuple(include or ()), tuple(exclude or ())
    head = output_head(model)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    report = ConversionReport()
    used_includes: set[str] = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            report.already.append(name)
            continue
        if type(module) is not nn.Linear:
            if isinstance(module, nn.Linear):  # a subclass we do not own, e.g. AutoBitLinear
                report.skipped.append((name, f"{type(module).__name__} is not a plain nn.Linear"))
            continue
        if _matches(name, exclude):
            report.skipped.append((name, "excluded"))
            continue
        if include:
            hit = _matches(name, include)
            if hit is None:
                report.skipped.append((name, "not included"))
                continue
            used_includes.add(hit)
        elif module is head or _matches(name, DEFAULT_EXCLUDE):
            report.skipped.append((name, "output head stays full precision"))
            continue
        if id(module.weight) in embedding_weights:
            report.skipped.append((name, "weight tied to an embedding"))
            continue
        report.replaced.append(name)
    unused = [p for p in include if p not in used_includes]
    if unused:  # checked before anything is rewritten: a bad call leaves the model untouched
        raise BitNetError(f"include pattern(s) {unused} matched no nn.Linear module")
    for name in report.replaced:
        model.set_submodule(name, BitLinear.from_linear(model.get_submodule(name), config))
    if not report.replaced and not report.already:
        log.warning("quantize_model found no nn.Linear to convert in %s", type(model).__name__)
    return report
