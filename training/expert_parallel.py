"""DeepSpeed glue of expert-parallel pretraining (``deepspeed.ep_size`` in a recipe): process groups, expert
parameter marking, MoE optimizer groups, and the expert shards of checkpoints.

With ``ep_size = P`` (a divisor of the world size and of every layer's expert counts), DeepSpeed's groups are
(``deepspeed.utils.groups``, as its own ``deepspeed.moe.layer.MoE`` creates them): expert-parallel groups of P
consecutive ranks ([0..P-1], [P..2P-1], ...), whose members hold different experts and exchange tokens; and
expert-data-parallel groups of the ranks holding the same experts ([0, P, 2P, ...], [1, P+1, ...], ...). Each
expert weight is marked as DeepSpeed marks its experts (``allreduce = False``, ``group_name = "ep_size_P"``) and
goes to a ``moe`` optimizer group (``split_params_into_different_moe_groups_for_optimizer``): ZeRO-1/2 then
reduce and partition expert gradients within the expert-data-parallel group (dividing by the whole world, so the
update equals data parallelism's), non-expert ones over all ranks, and the gradient norm for clipping covers every
expert of every rank.

DeepSpeed's engine enables that MoE handling only when it finds a ``deepspeed.moe.layer.MoE`` module in the model:
:class:`ExpertParallelRegistration` is such a module without parameters, attached to the model beside the layers,
so the engine treats the model as an MoE model while ModuleFormer's own layers do the routing (DeepSpeed's
``TopKGate`` would impose a capacity and drop tokens, see the README). It declares no per-expert files of its own:
each rank's experts are saved by :func:`save_expert_shard` (safetensors) and restored by :func:`expert_load_fn`.

ZeRO-3 is refused (:func:`check_expert_parallel_config`): DeepSpeed 0.19 partitions native MoE experts only under
ZeRO-1/2 (its engine asserts "Native DeepSpeed MoE is not supported with ZeRO Stage 3"; only AutoEP, which
replaces the router, handles stage 3).
"""
from __future__ import annotations

import os
from typing import Optional

from torch import nn

from moduleformer_exit.expert_parallel import (expert_parallel_layers, gather_expert_state_dict, is_expert_parallel,
                                               local_expert_state_dict, shard_experts)

REGISTRATION = "ds_expert_parallel"  # attribute name of the registration module on the model
SHARD = "experts_ep{rank}.safetensors"  # one file per expert-parallel rank in a checkpoint tag directory


def group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert groups of size ``ep_size`` (``ep_size_<P>``)."""
    return f"ep_size_{ep_size}"


def check_expert_parallel_config(ep_size: int, zero_stage: int, world_size: Optional[int] = None,
                                 expert_counts: tuple = ()) -> list[str]:
    """The problems (with their fix) of running ``ep_size`` here; empty when it can run."""
    errors = []
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        return [f"deepspeed.ep_size must be a positive integer (1 = no expert parallelism), got {ep_size!r}"]
    if ep_size == 1:
        return []
    if zero_stage == 3:
        errors.append(f"deepspeed.ep_size={ep_size} needs ZeRO stage 0, 1 or 2: DeepSpeed 0.19 partitions expert "
                      f"parameters only under ZeRO-1/2 (stage 3 would gather every expert in every layer). Use "
                      f"zero_optimization.stage 2 with ep_size, or stage 3 with ep_size 1.")
    bad = sorted({c for c in expert_counts if c % ep_size})
    if bad:
        errors.append(f"deepspeed.ep_size={ep_size} must divide every layer's expert count (n_att_experts and "
                      f"n_mlp_experts), but {bad} are not multiples of it")
    if world_size is not None and world_size % ep_size:
        errors.append(f"deepspeed.ep_size={ep_size} must divide the number of processes ({world_size}): start a "
                      f"multiple of {ep_size} ranks or change ep_size")
    return errors


def _registration_class():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.utils import groups

    class ExpertParallelRegistration(DeepSpeedMoE):
        """Marks a model as an MoE model for DeepSpeed's engine (no parameters, never called)."""

        def __init__(self, num_experts: int, ep_size: int) -> None:
            nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: no gate, no experts of its own
            self.num_experts, self.ep_size = num_experts, ep_size
            self.expert_group_name = group_name(ep_size)
            self.num_local_experts = 0  # no DeepSpeed per-expert checkpoint files: see save_expert_shard

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if use_data_before_expert_parallel_:
                raise ValueError("use_data_before_expert_parallel_ is not supported with deepspeed.ep_size: the "
                                 "expert groups were created with consecutive expert-parallel ranks.")
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                raise RuntimeError(f"DeepSpeed's expert group {self.expert_group_name} vanished before the engine "
                                   f"started; call enable_expert_parallel right before deepspeed.initialize.")

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelRegistration only registers the model's expert-parallel layers with "
                               "DeepSpeed; it is never called.")

    return ExpertParallelRegistration


def enable_expert_parallel(model: nn.Module, ep_size: int) -> dict:
    """Shard ``model``'s experts over DeepSpeed's expert-parallel group of this rank, mark them as DeepSpeed expert
    parameters and register the model with DeepSpeed's MoE machinery (after ``init_distributed``, before
    ``deepspeed.initialize``). Returns ``{"ep_size", "ep_rank", "local_experts": {layer: E_local}}``."""
    from deepspeed.utils import groups

    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)  # as deepspeed.moe.layer.MoE does (private API)
    group = groups._get_expert_parallel_group(name)
    ep_rank = groups._get_expert_parallel_rank(name)
    layers = shard_experts(model, group, ep_size, ep_rank)
    for layer in layers:
        for p in (layer.experts.weight, layer.output_experts.weight):
            p.allreduce = False  # DeepSpeed's expert marker (deepspeed.moe.utils.is_moe_param)
            p.group_name = name
    model.add_module(REGISTRATION, _registration_class()(max(l.num_experts for l in layers), ep_size))
    return {"ep_size": ep_size, "ep_rank": ep_rank,
            "local_experts": {n: l.num_local_experts for n, l in expert_parallel_layers(model)}}


def moe_param_groups(groups_: list[dict]) -> list[dict]:
    """Optimizer groups with the expert parameters split into DeepSpeed MoE groups (``moe: True``, ``name:
    ep_size_<P>``); empty groups dropped. Input groups get names if they have none."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": g.get("name", f"group{i}"), **g} for i, g in enumerate(groups_)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


# ----------------------------------------------------------------------------------------------- checkpoints
def _ep_ranks(model: nn.Module) -> tuple[int, int, str]:
    from deepspeed.utils import groups

    ep_size = expert_parallel_layers(model)[0][1].ep_size
    name = group_name(ep_size)
    return groups._get_expert_parallel_rank(name), groups._get_expert_data_parallel_rank(name), name


def save_expert_shard(model: Optional[nn.Module], tag_dir: str) -> Optional[str]:
    """Write this rank's experts to ``tag_dir/experts_ep<r>.safetensors`` (one writer per expert-parallel rank:
    expert-data-parallel rank 0). Returns the path written, or None (not a writer / no expert parallelism)."""
    if model is None or not is_expert_parallel(model):
        return None
    from safetensors.torch import save_file

    ep_rank, edp_rank, _ = _ep_ranks(model)
    if edp_rank != 0:
        return None
    path = os.path.join(tag_dir, SHARD.format(rank=ep_rank))
    save_file({k: v.contiguous() for k, v in local_expert_state_dict(model).items()}, path)
    return path


def expert_load_fn(tag_dir: str):
    """A DeepSpeed ``custom_load_fn(src, dst)``: the module state DeepSpeed saved (written by data-parallel rank 0,
    so its expert tensors are EP rank 0's) with this rank's experts replaced from its shard file, loaded strictly."""
    def load(src: dict, dst: nn.Module) -> None:
        from safetensors.torch import load_file

        from .checkpoint import CheckpointError

        state = dict(src)
        if is_expert_parallel(dst):
            ep_rank, _, _ = _ep_ranks(dst)
            path = os.path.join(tag_dir, SHARD.format(rank=ep_rank))
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} is missing: this checkpoint holds no experts for expert-parallel rank "
                                      f"{ep_rank} (saved with another deepspeed.ep_size?). Resume with the ep_size it "
                                      f"was trained with, or start afresh with --no-resume.")
            shard = load_file(path)
            expected = set(local_expert_state_dict(dst))
            if set(shard) != expected:
                raise CheckpointError(f"{path} holds {sorted(set(shard) ^ expected)[:4]} where the model expects "
                                      f"other expert tensors: resume with the recipe it was saved with.")
            state.update(shard)
        dst.load_state_dict(state, strict=True)
    return load


def full_state_dict(model: nn.Module) -> dict:
    """The gathered state dict (every expert) of an expert-parallel model; the plain one otherwise. Collective."""
    if not is_expert_parallel(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    return gather_expert_state_dict(model)
