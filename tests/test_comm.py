"""Collectives on the group's communication device (distributed/comm.py) and the collective audit.

The audit is on for the whole test session (conftest sets MEGATRON_VGPO_COLLECTIVE_AUDIT=1); the multi-rank
test checks that it refuses what would fail under NCCL on a GPU and accepts the comm.py wrappers.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from megatron_vgpo.distributed import comm
from megatron_vgpo.distributed.multiprocess import run_on_ranks


@pytest.mark.parametrize(("backend", "expected"), [
    ("nccl", torch.device("cuda", 3)),
    ("gloo", torch.device("cpu")),
    ("cpu:gloo,cuda:nccl", torch.device("cuda", 3)),
])
def test_comm_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch, backend: str, expected: torch.device):
    seen: list = []

    def get_backend(group=None):
        seen.append(group)
        return backend

    monkeypatch.setattr(dist, "get_backend", get_backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    marker = object()
    assert comm.comm_device(marker) == expected  # type: ignore[arg-type]
    assert seen == [marker]  # the group's own backend is asked, not the default group's


def test_conftest_turns_the_audit_on():
    import os

    assert os.environ.get(comm.AUDIT_ENV) == "1"


_PROBE_SOURCE = '''
import torch.distributed as dist


def direct_all_reduce(tensor):
    dist.all_reduce(tensor)


def direct_all_gather(pieces, tensor):
    dist.all_gather(pieces, tensor)
'''


def _probe_module(name: str) -> types.ModuleType:
    """A module named like a project module (``megatron_vgpo.*``) or like Megatron's, calling dist directly."""
    module = types.ModuleType(name)
    exec(compile(_PROBE_SOURCE, f"<{name}>", "exec"), module.__dict__)
    return module


def _refused(fn, *args) -> str:
    try:
        fn(*args)
    except comm.CollectiveAuditError as err:
        return str(err)
    raise AssertionError(f"the audit let {fn.__name__} through")


def _audit_body(rank: int, world: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_vgpo.distributed.group_stats import all_gather_rows
    from megatron_vgpo.distributed.process_groups import group_timeout_s, init_model_parallel

    assert comm.audit_installed()
    out: dict = {}
    # rule (b): a project module calling torch.distributed directly (the old all_gather_rows) is refused
    project = _probe_module("megatron_vgpo._audit_probe")
    out["direct"] = _refused(project.direct_all_reduce, torch.ones(2))
    out["direct_gather"] = _refused(project.direct_all_gather, [torch.zeros(2) for _ in range(world)],
                                    torch.ones(2))
    # rule (a): a tensor not on the group's device is refused for any caller, before it reaches gloo
    out["meta"] = _refused(dist.all_reduce, torch.empty(2, device="meta"))
    megatron_like = _probe_module("megatron.core._audit_probe")
    out["megatron_meta"] = _refused(megatron_like.direct_all_reduce, torch.empty(2, device="meta"))
    t = torch.full((2,), float(rank + 1))
    megatron_like.direct_all_reduce(t)  # Megatron's own calls: only the device rule applies
    out["megatron_sum"] = t.tolist()

    # the wrappers pass the audit, on contiguous and non-contiguous tensors, results in the caller's tensors
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
    view = base.t()  # [3, 2], not contiguous
    comm.all_reduce(view)
    out["all_reduce"] = base.tolist()
    gathered = [torch.empty(3, 2).t() for _ in range(world)]  # non-contiguous outputs
    comm.all_gather(gathered, torch.full((2, 3), float(rank)))
    out["all_gather"] = [g.tolist() for g in gathered]
    b = torch.full((3,), float(rank))
    comm.broadcast(b, src=1)
    out["broadcast"] = b.tolist()
    comm.barrier()
    box = [{"rank": rank}]
    comm.broadcast_object_list(box, src=0)
    out["object"] = box[0]
    objects: list = [None] * world
    comm.all_gather_object(objects, rank * 2)
    out["objects"] = objects
    if rank == 0:
        comm.send_object_list([("w", (2,))], dst=1)
        comm.send(torch.tensor([7.0, 8.0]), dst=1)
    else:
        header: list = [None]
        comm.recv_object_list(header, src=0)
        buffer = torch.zeros(4)[::2]  # non-contiguous receive buffer
        comm.recv(buffer, src=0)
        out["p2p"] = (header[0], buffer.tolist())
    # group_stats on a sub-group built by Megatron, and the timeouts Megatron's groups were created with
    init_model_parallel(tp=world, timeout_s=3000.0)
    rows, offset = all_gather_rows(torch.arange(rank + 1, dtype=torch.int64).reshape(-1, 1) + 100 * rank,
                                   group=ps.get_tensor_model_parallel_group())
    out["rows"] = (rows.flatten().tolist(), offset)
    out["timeouts"] = (group_timeout_s(), group_timeout_s(ps.get_tensor_model_parallel_group()),
                       group_timeout_s(ps.get_data_parallel_group()))
    return out


def test_audit_refuses_bypasses_and_wrong_devices_and_accepts_comm_wrappers():
    results = run_on_ranks(_audit_body, world_size=2, megatron=True, timeout_s=300.0)
    for rank, out in enumerate(results):
        assert "torch.distributed.all_reduce called directly from megatron_vgpo._audit_probe" in out["direct"]
        assert "comm.all_reduce" in out["direct"]
        assert "all_gather called directly from megatron_vgpo._audit_probe" in out["direct_gather"]
        for key in ("meta", "megatron_meta"):
            assert "torch.distributed.all_reduce: tensor on meta, expected cpu for a gloo group" in out[key]
        assert out["megatron_sum"] == [3.0, 3.0]
        assert out["all_reduce"] == [[10.0, 12.0, 14.0], [16.0, 18.0, 20.0]]
        assert out["all_gather"] == [[[0.0] * 3] * 2, [[1.0] * 3] * 2]
        assert out["broadcast"] == [1.0] * 3
        assert out["object"] == {"rank": 0} and out["objects"] == [0, 2]
        assert out["rows"] == ([0, 100, 101], [0, 1][rank])
        # default group: the harness's 300 s; Megatron's groups: 3000 s rounded up to 50 minutes
        assert out["timeouts"] == (300.0, 3000.0, 3000.0)
    assert results[1]["p2p"] == (("w", (2,)), [7.0, 8.0])



_INIT_CHECK = '''
import torch.distributed as dist
from megatron_vgpo.distributed import comm
from megatron_vgpo.distributed.process_groups import group_timeout_s, init_torch_distributed
assert not comm.audit_installed()
init_torch_distributed(timeout_s=4321.0)
print(comm.audit_installed(), group_timeout_s(), dist.all_reduce.__name__, dist.get_world_size())
dist.destroy_process_group()
'''


def test_init_torch_distributed_installs_the_audit_and_sets_the_timeout():
    """What a torchrun rank of the job does first (here a world of one, in a fresh interpreter)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", _INIT_CHECK], capture_output=True, text=True, timeout=120,
                          env={**env, comm.AUDIT_ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "4321.0", "all_reduce", "1"]
