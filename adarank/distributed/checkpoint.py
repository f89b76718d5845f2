"""Checkpoints of a model and an adarank optimizer through ``torch.distributed.checkpoint``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .context import is_dtensor

__all__ = [
    "load_checkpoint",
    "save_checkpoint",
]


# --------------------------------------------------------------- checkpoints


def save_checkpoint(
    checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Save ``model`` and ``optimizer`` with ``torch.distributed.checkpoint`` (DCP).

    Every rank calls it. The state dicts come from DCP's own helpers
    (``get_state_dict``: parameter-name keys, DDP's ``module.`` prefix dropped,
    FSDP2 DTensors kept sharded) and are stored as ``{"model": ..., "optim":
    ...}``. Plain (non-DTensor) tensors are treated by DCP as replicated and
    written once: right for DDP, where every rank holds the same state, and for
    the replicated state of FSDP2 (right projectors, left-side moments,
    counters); ``AdaRankAdamW`` keeps its row-sharded state (left projectors,
    right-side moments, plain AdamW moments) as ``Shard(0)`` DTensors, so each
    rank writes its rows. Quantised left projectors under FSDP2 are refused
    (``ValueError``): they are per-rank data, not shards of one tensor.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # Decided from the group's setting, the same on every rank (an empty shard
    # holds an empty float32 P), so no rank is left waiting in DCP's collectives.
    for group in optimizer.param_groups:
        quantised = group.get("proj_bits", 32) < 32
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if not (quantised and is_dtensor(p) and ("proj_left" in st or "proj_left_codes" in st)):
                continue
            raise ValueError(
                "save_checkpoint: a row-sharded (FSDP2) left projector stored quantised "
                "(proj_bits < 32) is per-rank data (its quantisation groups restart at the "
                "shard boundary), which DCP cannot write as shards; use proj_bits=32 under "
                "FSDP2 to checkpoint"
            )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_id)


def _set_path(root: dict[str, Any], path: Sequence[Any], value: Any) -> None:
    node: Any = root
    for key, following in zip(path[:-1], path[1:], strict=True):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = empty
        else:
            node.setdefault(key, empty)
        node = node[key]
    if isinstance(node, list):
        while len(node) <= path[-1]:
            node.append(None)
    node[path[-1]] = value


def _get_path(root: Any, path: Sequence[Any]) -> Any:
    for key in path:
        try:
            root = root[key]
        except (KeyError, IndexError, TypeError):
            return None
    return root


def load_checkpoint(
    checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load a ``save_checkpoint`` checkpoint (a directory) into ``model`` and ``optimizer``.

    Every rank calls it. DCP loads into tensors of the right shapes, but the
    shapes of adarank's state follow the rank each layer chose (a projector is
    m×r), which a fresh optimizer cannot know; so the optimizer's template is
    built from the checkpoint's metadata: one empty tensor per saved tensor, of
    its saved shape and dtype (a DTensor on the current state's mesh and
    placements where the current state holds a DTensor under that key), and a
    placeholder for each saved number or string. The result goes through
    ``set_state_dict``, i.e. the optimizer's own ``load_state_dict``, so a
    checkpoint of another model still fails with its clear error.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import empty as dtensor_empty

    # Also initialises an empty optimizer's state (DCP runs one step at lr = 0).
    model_sd, current = get_state_dict(model, optimizer)
    metadata = dcp.FileSystemReader(os.fspath(checkpoint_id)).read_metadata()
    optim_sd: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        path = metadata.planner_data[key]
        if path[0] != "optim":
            continue
        value: Any = None
        if isinstance(meta, TensorStorageMetadata):
            like = _get_path(current, path[1:])
            dtype = meta.properties.dtype
            if isinstance(like, DTensor):
                value = dtensor_empty(
                    *meta.size,
                    dtype=dtype,
                    device_mesh=like.device_mesh,
                    placements=like.placements,
                )
            else:
                value = torch.empty(meta.size, dtype=dtype)
        _set_path(optim_sd, path[1:], value)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
