"""What the export formats can hold, checked on a model: at export, and early, when a run or
a plan declares its target (`export_target`), so a model llama.cpp cannot run is not trained
for hours first. One-line errors name the setting (or the layer and the multiple it needs)."""

from __future__ import annotations

from torch import nn

from ..errors import BitNetError
from ..nn.bitlinear import BitLinear
from .bitnet import BitNetLM

GGUF_TYPES = ("tq1_0", "tq2_0", "f16", "f32")
BLOCK = 256  # values per TQ1_0 / TQ2_0 block
TARGETS = ("none", "hf", "ternary", *(f"gguf-{t}" for t in GGUF_TYPES))
PROJECTIONS = 7  # q, k, v, o, gate, up, down


def check_exportable(
    model: nn.Module, what: str = "export", static: bool = False
) -> list[tuple[str, BitLinear]]:
    """The model's BitLinear layers (name, layer), after refusing, in one line naming the
    setting, any whose quantization a BitNet checkpoint cannot express. `static`: only what
    the configuration fixes (at the start of a run the lambda schedules have not finished)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if not layers:
        raise BitNetError(
            f"{what}: the model has no quantized layers (a full-precision run): train with "
            "quantize=true, or export it as the full-precision model it is"
        )
    for name, m in layers:
        c = m.config
        rules = [
            ("qat.enable_weight_quantization", not c.enable_weight_quantization),
            ("qat.weight_bits", c.weight_bits != 1.58),
            ("qat.per_channel", c.per_channel),
            ("qat.group_size", c.group_size is not None),
            ("qat.enable_activation_quantization", not c.enable_activation_quantization),
            ("qat.activation_bits", c.activation_bits != 8),
            ("qat.activation_granularity", c.activation_granularity != "token"),
            ("qat.activation_symmetric", not c.activation_symmetric),
            ("qat.activation_observer", c.activation_observer is not None),
            ("qat.learnable_scales", c.learnable_scales),
            ("qat.norm_placement", c.norm_placement == "input"),
        ]
        if not static:  # where the schedules stand now
            rules += [
                ("qat.weight_schedule (lambda unfinished)", m.weight_blend < 1),
                ("qat.activation_schedule (lambda unfinished)", m.activation_blend < 1),
                ("qat.weight_bit_stages (not at 1.58 bits)", m.stage_bits is not None),
            ]
        for setting, broken in rules:
            if broken:
                raise BitNetError(
                    f"{what}: {setting} is not what BitNet checkpoints hold (1.58-bit weights "
                    f"with one absmean scale per tensor, 8-bit per-token activations): {name}"
                )
    return layers


def check_gguf(
    model: nn.Module, gguf_type: str, static: bool = False, what: str | None = None
) -> None:
    """Refuse, in one line naming the setting, a model llama.cpp's bitnet graph cannot run."""
    what = what or f"export --format gguf --gguf-type {gguf_type}"
    if gguf_type not in GGUF_TYPES:
        raise BitNetError(f"--gguf-type {gguf_type!r} is invalid: expected {', '.join(GGUF_TYPES)}")
    if not isinstance(model, BitNetLM):
        raise BitNetError(
            f"export --format gguf writes llama.cpp's bitnet architecture from a BitNetLM; this "
            f"model is a {type(model).__name__}"
        )
    layers = check_exportable(model, what, static)
    c = model.config
    if c.hidden_act != "silu":
        raise BitNetError(
            f"{what}: model.hidden_act={c.hidden_act}, but llama.cpp's bitnet "
            "graph runs a SiLU gated FFN (train with model.hidden_act=silu)"
        )
    if not c.tie_word_embeddings:
        raise BitNetError(
            f"{what}: model.tie_word_embeddings=false, but llama.cpp's bitnet "
            "graph uses the token embedding as the output layer (train with it true)"
        )
    if len(layers) != PROJECTIONS * c.num_hidden_layers:
        raise BitNetError(
            f"{what}: llama.cpp's bitnet graph quantizes all 7 projections of "
            f"every block; this model quantizes {len(layers)} layers"
        )
    if gguf_type.startswith("tq"):
        for name, m in layers:
            if m.in_features % BLOCK:
                raise BitNetError(
                    f"{what}: {name} has in_features="
                    f"{m.in_features}, not a multiple of {BLOCK} (the ternary types' block); "
                    "use f16 / f32 or a width that is"
                )


def check_ternary(model: nn.Module, what: str) -> None:
    """Refuse what `--format ternary` cannot hold: weights that are not ternary, and static
    activation observers (their calibrated ranges are not carried)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if not layers:
        raise BitNetError(f"{what}: the model has no quantized layers (a full-precision run)")
    for name, m in layers:
        c = m.config
        for setting, broken in (
            ("qat.enable_weight_quantization", not c.enable_weight_quantization),
            ("qat.weight_bits", c.weight_bits != 1.58),
            ("qat.activation_observer", c.activation_observer is not None),
        ):
            if broken:
                raise BitNetError(
                    f"{what}: {setting} is not what the ternary format holds (1.58-bit "
                    f"weights, dynamic activation scales): {name}"
                )


def check_target(model: nn.Module, target: str) -> None:
    """Refuse early a model that export target `target` (TARGETS) could not hold: only what
    its configuration fixes (the schedules have not run yet)."""
    if target not in TARGETS:
        raise BitNetError(f"export_target={target!r} is invalid: expected {', '.join(TARGETS)}")
    if target == "none":
        return
    if target.startswith("gguf-"):
        check_gguf(model, target.removeprefix("gguf-"), True, f"export_target={target}")
        return
    if target == "ternary":  # packs any ternary granularity; the activations as configured
        check_ternary(model, f"export_target={target}")
        return
    layers = check_exportable(model, f"export_target={target}", static=True)
    if target == "hf":
        check_four_rows(layers, f"export_target={target}")


def check_four_rows(layers, what: str, hint: str = "") -> None:
    """Refuse a layer whose out_features `transformers`' packing (4 rows a byte) cannot hold."""
    for name, m in layers:
        if m.out_features % 4:
            raise BitNetError(
                f"{what}: {name} has out_features={m.out_features}, not a multiple of 4: "
                f"transformers' packed layout holds 4 rows per byte{hint}"
            )
