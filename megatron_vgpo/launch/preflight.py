"""Pre-flight checks run on every node before ``torchrun`` starts the job; they fail fast with a clear message.

    python -m megatron_vgpo.launch.preflight --nnodes 2 --nproc-per-node 8 --node-rank 1 \
        --master-addr head-node --master-port 29500 [--ckpt CKPT] [--connect-timeout 60] \
        -- CONFIG.yaml [key=value ...]

Checks (each prints ``ok``, ``skip`` or ``FAIL`` with the reason; exit status 1 when any fails, 2 for a bad
command line or config):

1. **world size**: ``nnodes x nproc_per_node`` is a multiple of ``parallel.tp x parallel.pp``, and TP fits in
   one node (``nproc_per_node`` is a multiple of ``parallel.tp``).
2. **model**: ``model.hf_dir`` (when set) holds ``config.json`` and ``*.safetensors``, and the model can be laid
   out at the configured TP / PP (heads, KV heads, layers); with ``hf_dir: null`` the job builds the tiny model.
3. **checkpoint** (``--ckpt``): a complete Megatron checkpoint (``vgpo_checkpoint.json``) or a root whose
   ``latest`` points at one.
4. **master**: node rank 0 checks that the master address is one of its own and the port is free to listen on
   (with ``--rdzv-endpoint``: the node owning that address does); every other node opens a TCP connection to
   ``master:port`` (retrying until ``--connect-timeout``), so a wrong address, a firewall or a master that never
   started is reported before any rank waits on a rendezvous.
5. **GPU memory** (only when CUDA is present): at least ``nproc_per_node`` GPUs, each with at least the memory
   the planner (:mod:`megatron_vgpo.launch.planner`) says the worst GPU of this layout needs, for
   ``trainer.micro_batch_tokens`` and the colocated SGLang share (``rollout.engine_kwargs.mem_fraction_static``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """A check failed; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check: ``status`` is ``ok``, ``skip`` or ``FAIL``."""

    name: str
    status: str
    message: str


def check_world_size(nnodes: int, nproc_per_node: int, tp: int, pp: int, dp: int = 1) -> str:
    """The world must be a multiple of TP x PP (equal to TP x PP x DP when ``dp`` is not 1) and a node must
    hold whole TP groups."""
    world = nnodes * nproc_per_node
    if nnodes < 1 or nproc_per_node < 1:
        raise PreflightError(f"nnodes ({nnodes}) and nproc_per_node ({nproc_per_node}) must be >= 1")
    if world % (tp * pp):
        raise PreflightError(
            f"world size {world} (nnodes {nnodes} x nproc_per_node {nproc_per_node}) is not divisible by "
            f"parallel.tp ({tp}) x parallel.pp ({pp}) = {tp * pp}; launch a multiple of {tp * pp} processes "
            f"or change the layout (megatron-vgpo plan lists the feasible ones)")
    if dp != 1 and world != tp * pp * dp:
        raise PreflightError(
            f"world size {world} (nnodes {nnodes} x nproc_per_node {nproc_per_node}) != parallel.tp ({tp}) x "
            f"parallel.pp ({pp}) x parallel.dp ({dp}) = {tp * pp * dp}; launch {tp * pp * dp} processes, or set "
            f"parallel.dp=1 to let the world size decide (DP{world // (tp * pp)})")
    if nproc_per_node % tp:
        raise PreflightError(
            f"nproc_per_node {nproc_per_node} is not a multiple of parallel.tp ({tp}): a tensor-parallel group "
            "must stay inside one node")
    return f"world {world} = TP{tp} x PP{pp} x DP{world // (tp * pp)}"


def check_model(hf_dir: str | None, tp: int, pp: int) -> tuple[str, Any]:
    """``(message, HF config or None)``: the model folder is complete enough to start and fits the layout."""
    if hf_dir is None:
        return "model.hf_dir is null: the job builds the tiny model under RUN_DIR/model", None
    from megatron_vgpo.checkpoint.memory_plan import LayoutError, check_layout
    from megatron_vgpo.models.known_configs import load_hf_config

    folder = Path(hf_dir)
    if not folder.is_dir():
        raise PreflightError(f"model.hf_dir={folder}: folder not found on this node (mount it or fix the path)")
    if not (folder / "config.json").is_file():
        raise PreflightError(f"model.hf_dir={folder}: no config.json (expected a Hugging Face Qwen2.5-VL folder)")
    if not any(folder.glob("*.safetensors")):
        raise PreflightError(f"model.hf_dir={folder}: no *.safetensors weight files")
    try:
        cfg = load_hf_config(folder)
        check_layout(cfg, tp, pp)
    except (ValueError, LayoutError) as e:
        raise PreflightError(f"model.hf_dir={folder}: {e}") from e
    return f"{folder} (layout TP{tp} x PP{pp} supported)", cfg


def check_job_layout(cfg: Any, hf_dir: str | Path, *, nnodes: int = 1, nproc_per_node: int | None = None) -> str:
    """Refuse, in one line, a training job whose layout cannot run, before any rank builds a model.

    Checks the world (``nnodes x nproc_per_node``; default one node of ``tp * pp * dp`` processes, what the
    single-process command launches) against ``parallel``, the model folder's config against TP/PP (heads,
    KV heads, MLP width, layers) and that a step's trajectories split over the DP ranks.
    """
    par = cfg.parallel
    nproc = nproc_per_node if nproc_per_node is not None else par.tp * par.pp * par.dp
    world = check_world_size(nnodes, nproc, par.tp, par.pp, par.dp)
    from megatron_vgpo.checkpoint.memory_plan import LayoutError, check_layout
    from megatron_vgpo.models.known_configs import load_hf_config

    try:
        check_layout(load_hf_config(Path(hf_dir)), par.tp, par.pp)
    except (ValueError, LayoutError) as e:
        raise PreflightError(f"parallel.tp={par.tp} parallel.pp={par.pp} do not fit the model {hf_dir}: {e}") from e
    dp = nnodes * nproc // (par.tp * par.pp)
    trajectories = cfg.trainer.prompts_per_step * cfg.rollout.n
    if cfg.trainer.steps > 0 and trajectories % dp:
        raise PreflightError(f"trainer.prompts_per_step ({cfg.trainer.prompts_per_step}) x rollout.n "
                             f"({cfg.rollout.n}) = {trajectories} trajectories per step do not split over {dp} "
                             "data-parallel ranks; make the product a multiple of the DP size")
    return world


def check_checkpoint(path: str) -> str:
    """A complete Megatron checkpoint (or a root with ``latest``) exists at ``path``."""
    from megatron_vgpo.checkpoint.dist_checkpoint import CheckpointError, resolve_checkpoint

    if not Path(path).exists():
        raise PreflightError(f"checkpoint {path}: not found on this node (import one with "
                             "tools/convert_checkpoint.py import, or fix the path / mount)")
    try:
        return str(resolve_checkpoint(path))
    except CheckpointError as e:
        raise PreflightError(f"checkpoint {e}") from e


def is_local_address(addr: str) -> bool:
    """True when ``addr`` resolves to an address of this host (one a socket can bind)."""
    try:
        infos = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def check_master(addr: str, port: int, node_rank: int, timeout_s: float = 30.0, *, rendezvous: bool = False) -> str:
    """The master (static rendezvous: node rank 0) or the c10d rendezvous endpoint (``rendezvous=True``: whichever
    node owns that address) must be able to listen on ``addr:port``; every other node must reach it by TCP
    within ``timeout_s`` (retried every second, so the nodes may start in any order)."""
    if not 0 < port < 65536:
        raise PreflightError(f"master port {port} is out of range")
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PreflightError(f"master address {addr!r} does not resolve on this node ({e})") from e
    local = is_local_address(addr)
    if node_rank == 0 and not rendezvous and not local:
        raise PreflightError(f"master address {addr!r} is not an address of this node, but node rank 0 hosts the "
                             "rendezvous: run node rank 0 on the master host or fix --master-addr")
    if (node_rank == 0 and not rendezvous) or (rendezvous and local):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PreflightError(f"master port {port} is already in use on {addr} (another job?); pick "
                                         "another port") from e
                raise PreflightError(f"cannot listen on master port {port}: {e}") from e
        return f"{addr}:{port} is this node; port free"
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(timeout_s, 0.1))):
                return f"connected to {addr}:{port}"
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise PreflightError(
        f"master {addr}:{port} unreachable from node rank {node_rank} after {timeout_s:g}s ({last}); start node "
        "rank 0 first, check the address and port, and that no firewall blocks it")


def check_gpu_memory(need_bytes: int, devices: Sequence[tuple[str, int]], nproc_per_node: int,
                     layout: str) -> str:
    """Every local GPU (``(name, total bytes)``) has ``need_bytes``; there are at least ``nproc_per_node``."""
    gib = 1024**3
    if len(devices) < nproc_per_node:
        raise PreflightError(f"nproc_per_node {nproc_per_node} but only {len(devices)} GPU(s) visible on this node")
    small = [(i, n, b) for i, (n, b) in enumerate(devices[:nproc_per_node]) if b < need_bytes]
    if small:
        i, name, total = small[0]
        raise PreflightError(
            f"GPU {i} ({name}, {total / gib:.1f} GiB) has less memory than {layout} needs per GPU "
            f"({need_bytes / gib:.1f} GiB by the planner); choose a layout with `megatron-vgpo plan`, use more "
            "GPUs, or lower the micro-batch / colocated SGLang fraction")
    return f"{len(devices)} GPU(s) of {min(b for _, b in devices) / gib:.1f} GiB >= {need_bytes / gib:.1f} GiB"


def local_cuda_devices() -> list[tuple[str, int]]:
    """``(name, total memory bytes)`` of every visible CUDA device (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append((props.name, int(props.total_memory)))
    return out


def sglang_fraction(cfg: Any, given: float | None) -> float:
    """GPU fraction a colocated SGLang engine holds: ``given``, else ``rollout.engine_kwargs.mem_fraction_static``
    when the rollout backend is SGLang (in-process, or servers the job launches on this node), else 0."""
    if given is not None:
        return given
    if cfg.rollout.backend == "sglang" or (cfg.rollout.backend == "sglang_server" and not cfg.rollout.server_urls):
        return float(cfg.rollout.engine_kwargs.get("mem_fraction_static", 0.0))
    return 0.0


def run_checks(args: argparse.Namespace) -> list[CheckResult]:
    """Run every check; a failure is recorded (not raised) so that all problems are reported at once."""
    from megatron_vgpo.config import load_config

    cfg = load_config(args.config, args.overrides)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    results: list[CheckResult] = []
    hf_cfg = None

    def record(name: str, fn: Any) -> Any:
        try:
            out = fn()
        except PreflightError as e:
            results.append(CheckResult(name, "FAIL", str(e)))
            return None
        message = out[0] if isinstance(out, tuple) else out
        results.append(CheckResult(name, "ok", message))
        return out

    record("world size", lambda: check_world_size(args.nnodes, args.nproc_per_node, tp, pp, cfg.parallel.dp))
    model_out = record("model", lambda: check_model(cfg.model.hf_dir, tp, pp))
    if model_out is not None:
        hf_cfg = model_out[1]
    if args.ckpt:
        record("checkpoint", lambda: check_checkpoint(args.ckpt))
    if args.rdzv_endpoint:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        addr, port_num = host or args.rdzv_endpoint, int(port or 29400)
    else:
        addr, port_num = args.master_addr, args.master_port
    if args.skip_master_check:
        results.append(CheckResult("master", "skip", "--skip-master-check"))
    else:
        record("master", lambda: check_master(addr, port_num, args.node_rank, args.connect_timeout,
                                              rendezvous=bool(args.rdzv_endpoint)))
    devices = local_cuda_devices()
    world = args.nnodes * args.nproc_per_node
    if not devices:
        results.append(CheckResult("gpu memory", "skip", "no CUDA device (CPU run, gloo)"))
    elif hf_cfg is None:
        results.append(CheckResult("gpu memory", "skip", "no model folder to plan from (tiny model)"))
    elif world % (tp * pp) == 0:
        from megatron_vgpo.checkpoint.memory_plan import plan_layout
        from megatron_vgpo.launch.planner import option_from_plan

        gpu_bytes = min(b for _, b in devices)
        tokens = args.micro_batch_tokens or cfg.trainer.micro_batch_tokens
        plan = plan_layout(hf_cfg, tp, pp, world // (tp * pp), micro_batch_tokens=tokens,
                           recompute=cfg.parallel.recompute)
        opt = option_from_plan(plan, gpu_bytes, int(sglang_fraction(cfg, args.colocate_sglang_fraction) * gpu_bytes),
                               int(args.reserve_gib * 1024**3))
        need = opt.need_bytes_distributed
        record("gpu memory", lambda: check_gpu_memory(need, devices, args.nproc_per_node,
                                                      f"TP{tp} x PP{pp} x DP{opt.dp}"))
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    from megatron_vgpo.launch.planner import DEFAULT_RESERVE_GIB

    p = argparse.ArgumentParser(prog="python -m megatron_vgpo.launch.preflight",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of a c10d rendezvous (instead of master)")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the master")
    p.add_argument("--skip-master-check", action="store_true")
    p.add_argument("--ckpt", default="", help="Megatron checkpoint the job will load (checked to exist)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="default: trainer.micro_batch_tokens")
    p.add_argument("--colocate-sglang-fraction", type=float, default=None,
                   help="default: rollout.engine_kwargs.mem_fraction_static with the SGLang backend, else 0")
    p.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB)
    p.add_argument("config", help="the job's YAML config")
    p.add_argument("overrides", nargs="*", help="the job's key=value overrides")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per check; exit 0 when all pass, 1 when one fails, 2 for a bad config."""
    from megatron_vgpo.config import ConfigError

    args = parse_args(argv)
    try:
        results = run_checks(args)
    except ConfigError as e:
        print(f"preflight: bad config: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(f"preflight: {r.name:<11} {r.status:<4} {r.message}", file=sys.stderr if r.status == "FAIL"
              else sys.stdout)
    failed = [r for r in results if r.status == "FAIL"]
    if failed:
        print(f"preflight FAILED ({len(failed)} check(s)); nothing was launched", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
