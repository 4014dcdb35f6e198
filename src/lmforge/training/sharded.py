"""FSDP2: parameters, gradients and optimizer state sharded across the torchrun processes, block by
block (`torch.distributed.fsdp.fully_shard`), and their checkpoints through PyTorch's Distributed
Checkpoint: each process writes its own shards in parallel, and a later run re-shards them for
however many processes it has (or loads them whole, without --fsdp)."""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..core.errors import LMForgeError
from ..core.runtime import Dist
from ..models.transformer import Block

SHARDS = "dcp"  # the Distributed Checkpoint directory inside state/


def check_fsdp(dist: Dist) -> None:
    if dist.world < 2:
        raise LMForgeError("--fsdp shards the model across processes: launch it with torchrun "
                           "(e.g. torchrun --nproc_per_node 8 -m lmforge pretrain ... --fsdp)")


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard each transformer block, then the rest (embeddings, final norm, head) as the root.
    On CUDA the blocks compute in bf16 from an fp32 master copy, and gradients reduce in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if hasattr(model, "score_targets"):  # masked-token evaluation: gathers the root's weights as forward does
        register_fsdp_forward_method(model, "score_targets")
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: FSDPModule) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally: reduce-scatter only after the last one."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "parts", [optimizer]))  # MuonAdamW is two


def write_shards(directory: Path, model: torch.nn.Module, optimizer, dist: Dist) -> dict | None:
    """Every process: its shards of the model and optimizer to DIR/state.new/dcp (in parallel), and
    the full weights gathered to rank 0, which gets them back (the others get None) to finish the
    state directory and write model.safetensors."""
    new = directory / "state.new"
    dist.on_main(lambda: new.exists() and shutil.rmtree(new))  # a crashed save's leftovers
    model_sd, optim_sd = get_state_dict(model, optimizers(optimizer))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(new / SHARDS))
    return full_weights(model, dist)


def full_weights(model: torch.nn.Module, dist: Dist) -> dict | None:
    """Every process: gather the full weights to rank 0's CPU memory; rank 0 gets them (a tied
    output matrix once, as `weights_for_saving` keeps it), the others None."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return None
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v.contiguous() for k, v in full.items() if k in keep}


def read_shards(state: Path, model: torch.nn.Module, optimizer) -> None:
    """Load DIR/state/dcp into this model and optimizer, sharded or whole, whatever the number of
    processes that wrote it."""
    opts = optimizers(optimizer)
    model_sd, optim_sd = get_state_dict(model, opts)
    saved = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():  # loading without a process group is intended: say nothing
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(saved, checkpoint_id=str(state / SHARDS))
    except Exception as e:  # a shard missing or of another shape: say so in one line
        raise LMForgeError(f"{state / SHARDS}: cannot load this sharded checkpoint into this model "
                           f"({str(e).splitlines()[0][:200]})") from None
    set_state_dict(model, opts, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
