"""Stream the whole model's weights, as full HF checkpoint tensors, to the one rank that feeds the engine.

:func:`megatron_vgpo.checkpoint.hf_mapping.iter_hf_weights` yields a stage's tensors on that stage's TP rank
0 (after all-gathering the TP shards). A colocated rollout engine is driven by one process (global rank
``dst``, normally 0), so with pipeline parallelism the other stages' tensors must travel to it. This module
walks the stages in order: the stage that owns ``dst`` yields its own tensors directly; every other stage's
TP rank 0 (in ``dst``'s data-parallel replica) sends each tensor point-to-point (a small header object, then
the tensor) while ``dst`` receives and yields it. One tensor is in flight at a time, so memory stays at one
full tensor (plus the TP gather) however large the model; the consumer (a bucketing transport) decides how
many it keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_vgpo.distributed import comm

_END = "__end_of_stage__"


def iter_model_weights_to_rank(model: Any, hf_config: Any, *, dst: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Yield every ``(HF checkpoint name, full tensor)`` of the model on global rank ``dst``.

    Collective: EVERY rank must consume the iterator to the end (TP all-gathers inside each stage, and
    point-to-point transfers between stages). Ranks other than ``dst`` yield nothing. Each HF name is
    yielded exactly once; tensors are on the sender's device (CPU tensors travel over gloo, CUDA tensors
    over NCCL).
    """
    from megatron.core import parallel_state as ps

    from megatron_vgpo.checkpoint.hf_mapping import iter_hf_weights

    rank = dist.get_rank()
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    my_stage = ps.get_pipeline_model_parallel_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    # Only the pipeline replica that contains ``dst`` talks to it; the others just take part in their TP
    # gathers. ``dst`` must be a TP-rank-0 rank (it is the stage's emitting rank).
    in_dst_replica = dst in pp_ranks
    if rank == dst and tp_rank != 0:
        raise ValueError(f"dst={dst} must be tensor-parallel rank 0 of its stage (it is TP rank {tp_rank})")
    device = next(iter(model.parameters())).device
    for stage in range(ps.get_pipeline_model_parallel_world_size()):
        if my_stage == stage:
            sends = in_dst_replica and tp_rank == 0 and rank != dst
            for name, tensor in iter_hf_weights(model, hf_config):
                if rank == dst:
                    yield name, tensor
                elif sends:
                    tensor = tensor.contiguous()
                    comm.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=dst)
                    comm.send(tensor, dst=dst)
            if sends:
                comm.send_object_list([_END], dst=dst)
        elif rank == dst:
            src = pp_ranks[stage]
            while True:
                header: list[Any] = [None]
                comm.recv_object_list(header, src=src)
                if header[0] == _END:
                    break
                name, shape, dtype = header[0]
                buffer = torch.empty(shape, dtype=dtype, device=device)
                comm.recv(buffer, src=src)
                yield name, buffer
