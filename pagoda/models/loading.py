"""Fill a model shard's parameters from checkpoint tensors, reading only the slices this rank holds.

Each parameter is its checkpoint tensor of the same name, or, when its module declares `shards`
(layers/linear.py), the listed row slices stacked in order (a fused q/k/v, a column-parallel shard, a vocabulary
shard) or one column slice (a row-parallel shard). Every parameter must be filled, and every checkpoint tensor
must have a place, unless another rank holds it (a layer of another pipeline stage) or it is derived (a tied LM
head, rotary frequencies).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.layers.linear import WeightShard
from pagoda.loader.tensors import TensorSource

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class _Target:
    param_name: str
    param: nn.Parameter
    offset: int  # first row of the parameter this slice fills
    shard: WeightShard | None  # None: the whole tensor


def _source_name(module_name: str, source: str) -> str:
    if "." in source:
        return source
    parent = module_name.rpartition(".")[0]
    return f"{parent}.{source}" if parent else source


def read_parameter(module_name: str, module: nn.Module, leaf: str, sources: Mapping[str, TensorSource],
                   consumed: set[str]) -> torch.Tensor:
    """The value of `module`'s parameter `leaf` (its shape, fp32), read from the checkpoint slices the module
    holds, as load_sharded_weights would fill it; the names of the tensors read are added to `consumed`. For the
    quantizer, which builds a layer from one weight at a time instead of from a loaded model."""
    shape = tuple(getattr(module, leaf).shape)

    def read(name: str, rows=None, cols=None) -> torch.Tensor:
        if name not in sources:
            raise ValueError(f"checkpoint lacks weights for: {module_name}.{leaf} ({name})")
        consumed.add(name)
        return sources[name].read(torch.float32, rows, cols)

    shards = getattr(module, "shards", None)
    if shards is None:
        value = read(f"{module_name}.{leaf}")
    elif leaf == "bias" and shards[0].dim == 1:  # row-parallel: the whole bias, on one rank only
        value = (read(f"{_source_name(module_name, shards[0].source)}.bias") if getattr(module, "bias_here", True)
                 else torch.zeros(shape))
    elif shards[0].dim == 1:
        value = read(f"{_source_name(module_name, shards[0].source)}.{leaf}", None, (shards[0].start, shards[0].stop))
    else:
        value = torch.cat([read(f"{_source_name(module_name, s.source)}.{leaf}", (s.start, s.stop)) for s in shards])
    if tuple(value.shape) != shape:
        raise ValueError(f"weight {module_name}.{leaf} has shape {tuple(value.shape)}, expected {shape}")
    return value


def weight_targets(model: nn.Module) -> tuple[dict[str, list[_Target]], set[str]]:
    """checkpoint tensor name -> where its slices go; and the names of parameters that are zero by design (the
    bias of a row-parallel layer on ranks other than the first)."""
    unique = {id(p): name for name, p in model.named_parameters()}  # a shared parameter loads under one name
    targets: dict[str, list[_Target]] = {}
    zeroed: set[str] = set()
    for module_name, module in model.named_modules():
        if getattr(module, "prebuilt", False):  # built from the checkpoint already (a quantized layer)
            continue
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            if unique.get(id(param)) != name:
                continue
            shards = getattr(module, "shards", None)
            if shards is None:
                targets.setdefault(name, []).append(_Target(name, param, 0, None))
                continue
            if leaf == "bias" and shards[0].dim == 1:  # row-parallel: the whole bias, on one rank only
                if getattr(module, "bias_here", True):
                    targets.setdefault(f"{_source_name(module_name, shards[0].source)}.bias", []).append(
                        _Target(name, param, 0, None))
                else:
                    zeroed.add(name)
                continue
            offset = 0
            for shard in shards:
                source = f"{_source_name(module_name, shard.source)}.{leaf}"
                targets.setdefault(source, []).append(_Target(name, param, offset, shard))
                offset += shard.size if shard.dim == 0 else 0
    return targets, zeroed


def _held_elsewhere(model: nn.Module, name: str) -> bool:
    shard = getattr(model, "shard", None)
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.config.tie_word_embeddings):
        return True
    if shard is None:
        return False
    layer = _LAYER.match(name)
    if layer is not None:
        return not shard.holds_layer(int(layer.group(1)))
    return shard.layout.pp_size > 1  # embeddings, final norm, LM head: on the first or last stage only


def load_sharded_weights(model: nn.Module, tensors: Iterable[tuple[str, TensorSource]],
                         consumed: Collection[str] = ()) -> None:
    """Fill every parameter of `model` from `tensors`; `consumed`: checkpoint tensors already read into layers
    built from them (a quantized layer), which need no place here."""
    targets, zeroed = weight_targets(model)
    filled: set[tuple[str, int]] = set()
    dtype = next(model.parameters()).dtype
    for name, source in tensors:
        places = targets.get(name)
        if places is None:
            if name in consumed or _held_elsewhere(model, name):
                continue
            raise ValueError(f"checkpoint weight {name!r} has no place in {type(model).__name__}")
        for t in places:
            shard = t.shard
            rows = (shard.start, shard.stop) if shard is not None and shard.dim == 0 else None
            cols = (shard.start, shard.stop) if shard is not None and shard.dim == 1 else None
            value = source.read(t.param.dtype if t.param.is_floating_point() else dtype, rows, cols)
            target = t.param.data
            if shard is not None and shard.dim == 0:
                target = target.narrow(0, t.offset, shard.size)
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"weight {name!r}{'' if shard is None else f' [{shard.start}:{shard.stop}]'} has "
                                 f"shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value)
            filled.add((t.param_name, t.offset))
    for name in zeroed:
        model.get_parameter(name).data.zero_()
    missing = sorted({t.param_name for places in targets.values() for t in places
                      if (t.param_name, t.offset) not in filled})
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
