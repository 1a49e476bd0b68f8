"""CPU benchmark of the VGPO factors: vectorized vs a per-sequence loop, and relative to ``policy_loss``.

    python benchmarks/bench_vgpo.py            # B=4096 trajectories x T=2048 tokens
    python benchmarks/bench_vgpo.py --quick    # B=256 x T=512

Time: wall-clock min and median, and the min of the process CPU time (all threads), over ``--repeats``
runs after one warm-up. The machine is shared, so wall times include waiting for a core; the CPU time
does not, and the last column ("CPU / loss") is the CPU time relative to ``policy_loss`` forward+backward
on the same batch. Peak memory: the peak of the process RSS (psutil, sampled every 2 ms by a background
thread, in a separate run) minus the RSS just before the call, i.e. the extra resident memory the call
needed; tracemalloc is not used because it does not see torch's allocator.
The per-sequence loop runs on the first ``--loop-rows`` rows only and is extrapolated linearly to B (its
cost is per row); its output is checked against the vectorized one on those rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from megatron_vgpo.algo.losses import policy_loss
from megatron_vgpo.algo.vgpo import (
    VGPOConfig,
    apply_vgpo,
    compensation_schedule,
    compute_vgpo_factors,
    focus_from_cosine,
)

logger = logging.getLogger("bench_vgpo")


class PeakRSS:
    """Context manager sampling the process RSS in a thread; ``extra_mib`` = peak - baseline."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.extra_mib = 0.0

    def __enter__(self) -> PeakRSS:
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.extra_mib = (self.peak - self.baseline) / 2**20


Row = tuple[str, float, float, float, float]


def measure(fn: Callable[[], Any], repeats: int) -> tuple[float, float, float, float]:
    """(min wall s, median wall s, min process CPU s, extra RSS MiB) over ``repeats`` runs after a warm-up.

    Process CPU time (all threads of this process) is the robust number on a shared machine: it does not
    count time spent waiting for a core. Memory is sampled in a separate run: the sampling thread competes
    for the GIL and would inflate times.
    """
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
        del out
    with PeakRSS() as mem:
        out = fn()
    del out
    return min(walls), statistics.median(walls), min(cpus), mem.extra_mib


def make_batch(B: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic batch: ragged lengths in [T/8, T], cosines in [-0.2, 0.8], 8 rollouts per prompt."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    cos = (torch.rand(B, T, generator=gen) - 0.2) * mask
    group_ids = torch.randperm(B, generator=gen) // 8 * 13 + 5  # interleaved, non-contiguous uids
    log_probs = -torch.rand(B, T, generator=gen) * 2
    old_log_probs = log_probs + 0.1 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, generator=gen)
    return dict(cos=cos, mask=mask, group_ids=group_ids, log_probs=log_probs, old=old_log_probs, adv=advantages)


def loop_vgpo(rho: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor, cfg: VGPOConfig):
    """Straightforward per-sequence implementation (1-D torch ops per row, dict of groups)."""
    B, T = rho.shape
    token_factor = torch.ones(B, T)
    score = torch.zeros(B)
    for i in range(B):
        L = int(mask[i].sum())
        if L == 0:
            continue
        r = rho[i, :L]
        pos = torch.arange(L)
        one_row = torch.ones(1, L, dtype=torch.bool)
        comp = compensation_schedule(pos.unsqueeze(0), torch.tensor([L]), one_row, cfg, r.dtype)[0]
        s0 = int(L * cfg.gamma)
        k = max(1, int((L - s0) * cfg.kappa))
        tau = torch.topk(r[s0:], k).values[-1]
        gate = (pos >= s0) & (r >= tau)
        w = r * (1 + gate * comp)
        w_hat = (w - w.min()) / (w.max() - w.min() + 1e-8)
        token_factor[i, :L] = (1 + w_hat - w_hat.mean()).clamp(*cfg.token_clamp)
        score[i] = w_hat.sum()
    traj = torch.ones(B)
    groups: dict[int, list[int]] = {}
    for i, uid in enumerate(group_ids.tolist()):
        groups.setdefault(uid, []).append(i)
    for rows in groups.values():
        s = score[rows]
        s_hat = (s - s.min()) / (s.max() - s.min() + 1e-8)
        traj[rows] = (1 + s_hat - s_hat.mean()).clamp(*cfg.traj_clamp)
    return token_factor, traj


def run(B: int, T: int, repeats: int, loop_rows: int) -> list[Row]:
    batch = make_batch(B, T)
    cfg = VGPOConfig()
    cfg_nodiag = VGPOConfig(diagnostics=False)
    mask, cos, ids = batch["mask"], batch["cos"], batch["group_ids"]
    rho = focus_from_cosine(cos, mask, cfg)
    rows: list[Row] = []

    def vgpo_full() -> torch.Tensor:
        r = focus_from_cosine(cos, mask, cfg)
        return apply_vgpo(batch["adv"], compute_vgpo_factors(r, mask, ids, cfg), mask)

    rows.append(("focus_from_cosine", *measure(lambda: focus_from_cosine(cos, mask, cfg), repeats)))
    for label, config in (("no diagnostics", cfg_nodiag), ("+ diagnostics", cfg)):
        factors_time = measure(lambda config=config: compute_vgpo_factors(rho, mask, ids, config), repeats)
        rows.append((f"compute_vgpo_factors ({label})", *factors_time))
    factors = compute_vgpo_factors(rho, mask, ids, cfg_nodiag)
    rows.append(("apply_vgpo", *measure(lambda: apply_vgpo(batch["adv"], factors, mask), repeats)))
    rows.append(("VGPO end to end (focus+factors+diagnostics+apply)", *measure(vgpo_full, repeats)))

    n = min(loop_rows, B)
    sub_ids = ids[:n]
    loop_min, loop_median, loop_cpu, loop_mem = measure(
        lambda: loop_vgpo(rho[:n], mask[:n], sub_ids, cfg), max(1, repeats // 2)
    )
    ref_tok, ref_traj = loop_vgpo(rho[:n], mask[:n], sub_ids, cfg)
    vec = compute_vgpo_factors(rho[:n], mask[:n], sub_ids, cfg_nodiag)
    if not (
        torch.allclose(vec.token_factor, ref_tok, atol=1e-5) and torch.allclose(vec.traj_factor, ref_traj, atol=1e-5)
    ):
        raise AssertionError("per-sequence loop and vectorized factors disagree")
    scale = B / n
    rows.append(
        (
            f"per-sequence loop, {n} rows x{scale:.0f} (extrapolated)",
            loop_min * scale,
            loop_median * scale,
            loop_cpu * scale,
            loop_mem,
        )
    )

    token_adv = apply_vgpo(batch["adv"], compute_vgpo_factors(rho, mask, ids, cfg_nodiag), mask)

    def loss_forward() -> torch.Tensor:
        return policy_loss(batch["log_probs"], batch["old"], token_adv, mask, global_tokens=int(mask.sum()))[0]

    def loss_forward_backward() -> torch.Tensor:
        lp = batch["log_probs"].clone().requires_grad_(True)
        loss = policy_loss(lp, batch["old"], token_adv, mask, global_tokens=int(mask.sum()))[0]
        loss.backward()
        return lp.grad

    rows.append(("policy_loss forward", *measure(loss_forward, repeats)))
    rows.append(("policy_loss forward+backward", *measure(loss_forward_backward, repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small size (B=256, T=512)")
    parser.add_argument("--batch", type=int, default=None, help="trajectories B (default 4096, quick 256)")
    parser.add_argument("--tokens", type=int, default=None, help="response slots T (default 2048, quick 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--loop-rows", type=int, default=256, help="rows timed for the per-sequence loop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    B = args.batch or (256 if args.quick else 4096)
    T = args.tokens or (512 if args.quick else 2048)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = run(B, T, args.repeats, args.loop_rows)
    load_after = os.getloadavg()[0]
    ref = {row[0]: row[3] for row in rows}
    loss_fb = ref["policy_loss forward+backward"]
    threads = torch.get_num_threads()
    logger.info(
        "B=%d T=%d, torch %s, %d threads, %d repeats, %d CPUs, 1-min load average %.1f -> %.1f",
        B, T, torch.__version__, threads, args.repeats, os.cpu_count() or 0, load_before, load_after,
    )  # fmt: skip
    logger.info("| step | wall min (s) | wall median (s) | CPU time min (s) | peak extra RSS (MiB) | CPU / loss |")
    logger.info("|---|---:|---:|---:|---:|---:|")
    for name, best, median, cpu, mib in rows:
        logger.info("| %s | %.3f | %.3f | %.3f | %.0f | %.2f |", name, best, median, cpu, mib, cpu / loss_fb)


if __name__ == "__main__":
    main()
