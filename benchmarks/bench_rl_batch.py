"""Host memory and time of one RL step's data preparation on one DP rank: before and after issue 11 item 5.

    python benchmarks/bench_rl_batch.py                      # 64 prompts x 8 samples, 2 images of 448x448, dp=2
    python benchmarks/bench_rl_batch.py --prompts 16 --n 4   # quicker

What one step prepares, measured on DP rank 0 of ``--dp`` (rank 0 also builds the rollout requests):

* ``before``: rank 0's requests from ``dataset[i]`` (the image processor runs for pixel values the engine
  never reads); then on every rank one processed prompt PER TRAJECTORY (``[dataset[i] for i in
  prompt_index]``), the whole global ``build_rl_batch`` and ``shard_for_data_parallel``.
* ``after``: the requests from ``dataset.prompt_inputs(i)`` (text + decoded images only); then
  ``build_local_rl_batch``: this rank's rows only, each distinct prompt processed once.

Each mode runs in its own fresh process (after one warm-up pass on 2 prompts). Peak host memory is the
process's peak RSS (``ru_maxrss``) minus its RSS once the dataset is built, i.e. the extra resident memory the
step needed; time is wall-clock (the machine is shared: read it as indicative). The ``after`` batch is
checked equal to the ``before`` shard in the same process run with ``--check``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil


def _write_data(out: Path, prompts: int, images: int, side: int, seed: int) -> Path:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    rows = []
    for k in range(prompts):
        pngs = []
        for _ in range(images):
            image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            for _ in range(12):
                x, y = rng.randrange(side), rng.randrange(side)
                draw.rectangle([x, y, x + rng.randrange(8, side // 3), y + rng.randrange(8, side // 3)],
                               fill=tuple(rng.randrange(256) for _ in range(3)))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append({"bytes": buffer.getvalue(), "path": None})
        rows.append({"problem": " ".join(["<image>"] * images) + f" Problem {k}: how many rectangles?",
                     "answer": str(k % 7), "images": pngs})
    path = out / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _rollouts(prompts: int, n: int, seed: int) -> tuple[list[int], list[list[int]], list[int], list[float]]:
    rng = random.Random(seed)
    draw = rng.sample(range(prompts), prompts)
    index = [i for i in draw for _ in range(n)]
    responses = [[rng.randrange(10, 1000) for _ in range(rng.randrange(64, 257))] for _ in index]
    uids = [1000 + k // n for k in range(len(index))]
    rewards = [float(rng.random() < 0.5) for _ in index]
    return index, responses, uids, rewards


def run_mode(mode: str, hf_dir: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One step's preparation in this process (``mode``: before | after); returns the measurements."""
    from transformers import AutoProcessor

    from megatron_vgpo.actor.rl_batch import build_local_rl_batch, build_rl_batch, shard_for_data_parallel
    from megatron_vgpo.data import PromptDataset
    from megatron_vgpo.rollout.base import RolloutRequest

    ds = PromptDataset([data], AutoProcessor.from_pretrained(hf_dir), max_prompt_length=8192)
    index, responses, uids, rewards = _rollouts(len(ds), args.n, args.seed)
    ids = {"pad_token_id": 0, "image_token_id": 151655}

    def step(prompt_ids: list[int], sel: list[int], resp: list[list[int]], uid: list[int], rew: list[float]) -> Any:
        if mode == "before":
            samples = [ds[i] for i in prompt_ids]  # rank 0: requests (pixel values unused)
            requests = [RolloutRequest(uid=str(i), prompt_text=s.prompt_text, images=list(s.images))
                        for i, s in zip(prompt_ids, samples)]
            full = build_rl_batch([ds[i] for i in sel], resp, uids=uid, rewards=rew, **ids)
            return requests, shard_for_data_parallel(full, 0, args.dp, args.mini_batches)
        samples = [ds.prompt_inputs(i) for i in prompt_ids]
        requests = [RolloutRequest(uid=str(i), prompt_text=s.prompt_text, images=list(s.images))
                    for i, s in zip(prompt_ids, samples)]
        return requests, build_local_rl_batch(ds.__getitem__, sel, resp, dp_rank=0, dp_size=args.dp,
                                              mini_batches=args.mini_batches, uids=uid, rewards=rew, **ids)

    warm = 2 * args.n
    step(sorted(set(index[:warm])), index[:warm], responses[:warm], uids[:warm], rewards[:warm])
    base_rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    _, local = step(sorted(set(index)), index, responses, uids, rewards)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {"mode": mode, "seconds": seconds, "extra_peak_rss_mib": max(peak - base_rss, 0) / 2**20,
           "local_rows": local.batch_size, "local_pixel_mib": local.pixel_values.numel() * 4 / 2**20}
    if args.check:
        full = build_rl_batch([ds[i] for i in index], responses, uids=uids, rewards=rewards, **ids)
        want = shard_for_data_parallel(full, 0, args.dp, args.mini_batches)
        import dataclasses

        import torch

        for f in dataclasses.fields(want):
            a, b = getattr(local, f.name), getattr(want, f.name)
            same = torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b
            if not same:
                raise AssertionError(f"{mode}: field {f.name} differs from the global build's shard")
        out["checked_equal"] = True
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--side", type=int, default=448, help="image side in pixels (the tiny processor's max: 448)")
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--mini-batches", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="also check the result against the global build")
    p.add_argument("--mode", choices=["before", "after"], help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.hf_dir, args.data, args)))
        return
    from megatron_vgpo.models.tiny_qwen2_5_vl import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = build_tiny_checkpoint(Path(tmp) / "tiny", preset="tiny", seed=0, tokenizer="bpe")
        data = _write_data(Path(tmp), args.prompts, args.images, args.side, args.seed)
        results = []
        for mode in ("before", "after"):
            command = [sys.executable, __file__, "--mode", mode, "--hf-dir", str(hf_dir), "--data", str(data),
                       "--prompts", str(args.prompts), "--n", str(args.n), "--dp", str(args.dp),
                       "--mini-batches", str(args.mini_batches), "--seed", str(args.seed)]
            if args.check:
                command.append("--check")
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{args.prompts} prompts x {args.n} samples, {args.images} images of {args.side}x{args.side} each, "
          f"dp={args.dp}, measured on DP rank 0 (which also builds the rollout requests)")
    print("| mode | time / step (s) | extra peak RSS (MiB) | local rows | local pixel_values (MiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['seconds']:.2f} | {r['extra_peak_rss_mib']:.0f} | {r['local_rows']} | "
              f"{r['local_pixel_mib']:.0f} |")


if __name__ == "__main__":
    main()
