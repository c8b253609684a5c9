"""Tensor parallelism (Megatron's layout on DTensor, `parallelize_module`): each transformer
block's attention and FFN split over the ranks of a mesh dimension.

q / k / v and gate / up are column-parallel (each rank computes its heads, its slice of the
FFN width, from the whole input); o_proj and down_proj are row-parallel (each rank multiplies
its slice of the input by its columns of the weight; the partial sums are all-reduced).
Embeddings, norms and the head stay replicated.

BitNet needs the whole row or the whole weight in three places, and gets it from DTensor's
own reductions, not per shard (nanotron's BitNet computes them per shard, so its results
depend on the layout):

* the ternary weight scale, mean |W| over the whole weight: BitLinear's quantizer reduces
  the DTensor weight, which all-reduces the shards' sums;
* the per-token activation absmax before a row-parallel layer, whose input is split along
  the features: `amax` over a sharded dimension is an all-reduced max;
* 2B4T's sub-norms (`attn_sub_norm`, `ffn_sub_norm`), which normalize the full width right
  before o_proj / down_proj: the norm runs on the sharded activations as a DTensor (its
  weight sharded the same way), so the mean of squares is an all-reduced sum. This is the
  all-reduce layout, not a sequence-parallel one: the activations between the column- and
  row-parallel layers stay split by features, and each norm costs one all-reduce of a
  (tokens, 1) tensor.

So TP=N gives TP=1's numbers (tested in float64: identical losses and ternary codes).
BitLinear takes its unfused path on DTensor weights (the fused kernel works on local
tensors).
"""

from __future__ import annotations

from torch import nn

from ..errors import BitNetError
from .activation_checkpoint import transformer_blocks

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def _shard_norm(norm: nn.Module, mesh) -> None:
    """Run `norm` on feature-sharded activations: its weight sharded along the features,
    its input (a local shard) seen as the DTensor it is a part of, its output left a
    DTensor for the row-parallel layer after it."""
    import torch
    from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor

    def partition(_name, module, mesh):
        for name, p in list(module.named_parameters(recurse=False)):
            shard = distribute_tensor(p.detach(), mesh, [Shard(0)])
            module.register_parameter(name, nn.Parameter(shard, requires_grad=p.requires_grad))

    def as_dtensor(_module, args, mesh):
        x = args[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Shard(x.dim() - 1)], run_check=False)
        return (x, *args[1:])

    with torch.no_grad():
        distribute_module(norm, mesh, partition, as_dtensor, None)


def _child(parent: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The submodule of `parent` holding all of `names` as direct children, if any."""
    for m in parent.modules():
        if all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
            return m
    return None


def apply_tensor_parallel(model: nn.Module, mesh) -> int:
    """Split every transformer block of `model` (attention `q/k/v/o_proj`, FFN
    `gate/up/down_proj`, and sub-norms `attn_sub_norm` / `ffn_sub_norm` where present) over
    1-D device mesh `mesh`, in place; returns the number of blocks. Head counts must divide
    by the mesh size, as must the FFN width (a one-line error otherwise)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = mesh.size()
    blocks = transformer_blocks(model)
    if not blocks:
        raise BitNetError(
            "distributed.strategy=tp: the model has no transformer blocks (a ModuleList named "
            "layers, h or blocks) to split"
        )
    for block in blocks:
        attn, ffn = _child(block, ATTENTION), _child(block, FFN)
        if attn is None or ffn is None:
            raise BitNetError(
                "distributed.strategy=tp needs Llama-style blocks (q_proj, k_proj, v_proj, "
                f"o_proj and gate_proj, up_proj, down_proj); {type(block).__name__} has not"
            )
        if getattr(attn.o_proj, "norm", None) is not None:
            raise BitNetError(
                "distributed.strategy=tp: qat.norm_placement=input puts a norm inside o_proj, "
                "whose input is split over the ranks: use the sub-norm placement"
            )
        heads = getattr(attn, "n_heads", None) or getattr(attn, "num_heads", None)
        kv = getattr(attn, "n_kv", None) or getattr(attn, "num_key_value_heads", None)
        width = ffn.up_proj.out_features
        for what, n in (
            ("attention heads", heads),
            ("key-value heads", kv),
            ("FFN width (intermediate_size)", width),
        ):
            if n is not None and n % tp:
                raise BitNetError(
                    f"distributed.strategy=tp over {tp} ranks: the model's {what}, {n}, does "
                    f"not divide by {tp}"
                )
        col, row = ColwiseParallel(), RowwiseParallel(input_layouts=Shard(-1))
        parallelize_module(attn, mesh, {"q_proj": col, "k_proj": col, "v_proj": col})
        parallelize_module(attn, mesh, {"o_proj": row})
        parallelize_module(ffn, mesh, {"gate_proj": col, "up_proj": col, "down_proj": row})
        # Each rank now computes heads / tp heads (the reshapes use these counts).
        if hasattr(attn, "n_heads"):
            attn.n_heads, attn.n_kv = attn.n_heads // tp, attn.n_kv // tp
        for name in ("attn_sub_norm", "ffn_sub_norm"):
            for m in (attn, ffn):
                if isinstance(getattr(m, name, None), nn.Module):
                    _shard_norm(getattr(m, name), mesh)
    return len(blocks)
