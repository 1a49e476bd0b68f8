"""GPU check of the bf16 Megatron actor on a 7B-shaped slice: one command, one table (one H200, < 8 min).

What it measures (one process, TP1, Megatron mixed precision: bf16 weights and compute, fp32 grads and
main params + Adam), on a model of Qwen2.5-VL-7B's width with ``--layers`` decoder layers (default 4) and
the real 152,064-token vocabulary (untied output layer), random bf16 weights written to a temporary HF
folder and loaded by :class:`~megatron_vgpo.actor.megatron_actor.MegatronActor` as a run would:

* ``train step``: :meth:`MegatronActor.train_step` (one mini-batch = one optimizer step) on ``--sequences``
  text-only trajectories of ``--seq`` tokens (a quarter prompt, the rest response), micro-batched by
  ``--micro-batch-tokens``: tokens/s and MFU.
* ``log-prob pass``: :meth:`MegatronActor.compute_log_probs` with VGPO focus on the same batch (no grad).
* ``VGPO factors``: ``focus_from_cosine`` + ``compute_vgpo_factors`` + ``apply_vgpo`` on the GPU at
  ``--vgpo-batch`` x ``--vgpo-tokens`` (default 4096 x 2048), also as a fraction of the train step.
* ``weight export``: :meth:`MegatronActor.export_hf_weights` (full HF-named tensors, the weight-sync
  source), GB/s of bf16 bytes.

FLOPs (stated in the table): with P = the parameters in matrix multiplies (decoder linears + output layer;
the embedding lookup and norms excluded), L layers, d = heads x head_dim, each sequence of n tokens and T
tokens in all: forward = 2 P T + 2 L d n T (causal attention: Q K^T and A V over n/2 keys on average),
training = 3 x forward = 6 P T + 6 L d n T. MFU = FLOPs / seconds / peak, peak = ``--peak-tflops``
(default 989: H200 bf16 dense). No Transformer Engine on the device: Megatron's local layer spec runs
(unfused attention that builds the [n, n] scores), so the MFU is that spec's, not TE's flash attention.

On the device (megatron-core is not installed there and it has no network; the wheel travels, never
committed). Here, once, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl megatron-core==0.16.1

(checked: megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl, 2.6 MB; it
needs torch, numpy, packaging, all on the device image). Then the device tool's ``run`` with
``carry=[".whl"]``, ``timeout_s=540`` and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \\
        python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json

On a CPU, ``--smoke`` runs the same code on tiny shapes (CI: ``tests/test_gpu_check_smoke.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger("gpu_check")

H200_BF16_DENSE_TFLOPS = 989.0


def hf_config_for(args: argparse.Namespace) -> Any:
    """Qwen2.5-VL-7B's config cut to ``args.layers`` decoder layers (``--smoke``: tiny widths too)."""
    from transformers import Qwen2_5_VLConfig

    from megatron_vgpo.models.known_configs import known_config_dict

    raw = known_config_dict("qwen2.5-vl-7b")
    raw["num_hidden_layers"] = raw["max_window_layers"] = args.layers
    vision = raw["vision_config"]
    vision["depth"] = args.vision_depth
    vision["fullatt_block_indexes"] = [args.vision_depth - 1]
    if args.smoke:
        raw.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1024, bos_token_id=1, eos_token_id=2)
        raw["rope_scaling"] = dict(raw.get("rope_scaling") or {}, mrope_section=[2, 3, 3])
        raw.pop("rope_parameters", None)
        vision.update(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    return Qwen2_5_VLConfig(**raw)


def write_random_checkpoint(hf_config: Any, out_dir: Path, device: torch.device, seed: int = 0) -> int:
    """``config.json`` + ``model.safetensors`` of random bf16 weights (norms 1, biases 0, matrices N(0, 0.02));
    returns the number of parameters."""
    from safetensors.torch import save_file

    from megatron_vgpo.checkpoint.hf_mapping import expected_hf_shapes

    gen = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_hf_shapes(hf_config).items():
        if name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        elif len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        tensors[name] = t.cpu()
    hf_config.save_pretrained(out_dir)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def make_batch(hf_config: Any, sequences: int, seq: int, seed: int = 0) -> Any:
    """``sequences`` text-only trajectories of ``seq`` tokens (prompt ``seq // 4``), 4 per prompt uid."""
    from megatron_vgpo.actor.rl_batch import build_rl_batch

    gen = torch.Generator().manual_seed(seed)
    high = min(int(hf_config.text_config.vocab_size), int(hf_config.image_token_id)) - 8
    prompt_len = max(1, seq // 4)
    prompts, responses = [], []
    for _ in range(sequences):
        ids = torch.randint(0, high, (prompt_len,), generator=gen)
        prompts.append(SimpleNamespace(input_ids=ids, pixel_values=None, image_grid_thw=None,
                                       mm_token_type_ids=torch.zeros_like(ids)))
        responses.append(torch.randint(0, high, (seq - prompt_len,), generator=gen))
    return build_rl_batch(prompts, responses, pad_token_id=0, image_token_id=int(hf_config.image_token_id),
                          uids=[i // 4 for i in range(sequences)], rewards=torch.rand(sequences, generator=gen))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls (after the caller's warm-up) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def matmul_params(actor: Any) -> tuple[int, int, int]:
    """(P: decoder linear + output-layer parameters, L: layers, d: heads x head_dim) of this rank's model."""
    lm = actor.module.language_model
    p = sum(w.numel() for n, w in lm.decoder.named_parameters() if w.dim() == 2)
    if getattr(lm, "output_layer", None) is not None and lm.output_layer.weight is not None:
        p += lm.output_layer.weight.numel()
    cfg = actor.module.config
    return p, cfg.num_layers, cfg.num_attention_heads * cfg.kv_channels


def vgpo_seconds(batch: int, tokens: int, device: torch.device, repeats: int, *, warmup: bool = True) -> float:
    """Median seconds of focus -> factors -> re-weighted advantages at [batch, tokens] on ``device``."""
    from megatron_vgpo.algo.vgpo import VGPOConfig, apply_vgpo, compute_vgpo_factors, focus_from_cosine

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(tokens // 8, tokens + 1, (batch,), generator=gen)
    mask = (torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    cos = ((torch.rand(batch, tokens, generator=gen) - 0.2).to(device)) * mask
    uids = (torch.arange(batch) // 8).to(device)
    adv = torch.randn(batch, generator=gen).to(device)
    cfg = VGPOConfig()

    def run() -> torch.Tensor:
        rho = focus_from_cosine(cos, mask, cfg)
        return apply_vgpo(adv, compute_vgpo_factors(rho, mask, uids, cfg), mask)

    if warmup:
        run()
    return timed(run, repeats)[0]


def export_seconds(actor: Any, repeats: int, *, warmup: bool = True) -> tuple[float, int]:
    """Median seconds to stream every HF tensor out of the actor, and the bytes streamed."""
    def run() -> int:
        return sum(t.numel() * t.element_size() for _, t in actor.export_hf_weights())

    if warmup:
        run()
    return timed(run, repeats)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, CI): checks the script runs")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; smoke 2)")
    p.add_argument("--vision-depth", type=int, default=2, help="vision blocks (unused by the text batch)")
    p.add_argument("--sequences", type=int, default=None, help="trajectories per step (default 8; smoke 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per trajectory (default 2048; smoke 32)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="default 8192; smoke 64")
    p.add_argument("--vgpo-batch", type=int, default=None, help="default 4096; smoke 64")
    p.add_argument("--vgpo-tokens", type=int, default=None, help="default 2048; smoke 32")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up (default 3)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help="accelerator bf16 dense peak for MFU (H200: 989)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    defaults = (dict(layers=2, sequences=4, seq=32, micro_batch_tokens=64, vgpo_batch=64, vgpo_tokens=32,
                     repeats=1) if args.smoke else
                dict(layers=4, sequences=8, seq=2048, micro_batch_tokens=8192, vgpo_batch=4096, vgpo_tokens=2048,
                     repeats=3))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.vision_depth = 1
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything above, on this process's device; returns the results (also printed as a table)."""
    import dataclasses

    from megatron_vgpo.actor.megatron_actor import ActorConfig, MegatronActor
    from megatron_vgpo.distributed.process_groups import destroy, init_model_parallel
    from megatron_vgpo.platform import compute_device

    started = time.perf_counter()
    init_model_parallel(tp=1, pp=1, seed=1234)
    device = compute_device(0)
    hf_config = hf_config_for(args)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                               "smoke": args.smoke, "layers": args.layers, "recompute": args.recompute,
                               "torch": torch.__version__}
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            t0 = time.perf_counter()
            results["hf_params"] = write_random_checkpoint(hf_config, Path(tmp), device)
            actor = MegatronActor(tmp, ActorConfig(params_dtype=torch.bfloat16, lr=1e-6, recompute=args.recompute,
                                                   micro_batch_tokens=args.micro_batch_tokens,
                                                   use_distributed_optimizer=False))
            results["setup_s"] = time.perf_counter() - t0
        batch = make_batch(hf_config, args.sequences, args.seq)
        tokens = int(batch.seq_lengths.sum())
        p, layers, d = matmul_params(actor)
        fwd_flops = 2 * p * tokens + 2 * layers * d * args.seq * tokens
        results.update(tokens=tokens, matmul_params=p, attn_width=d)

        if not args.smoke:  # warm-ups (the smoke run only checks that everything runs)
            actor.compute_log_probs(batch, with_focus=True)
        lp_s, res = timed(lambda: actor.compute_log_probs(batch, with_focus=True), args.repeats)
        train_batch = dataclasses.replace(
            batch, old_log_probs=res.log_probs, advantages=torch.randn(batch.batch_size, 1) * batch.response_mask)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if not args.smoke:
            actor.train_step(train_batch, mini_batches=1)  # allocates the optimizer states
        step_s, metrics = timed(lambda: actor.train_step(train_batch, mini_batches=1), args.repeats)
        if not all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "grad_norm")):
            raise RuntimeError(f"non-finite train step: {metrics}")
        results["peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                                      else float("nan"))
        peak = args.peak_tflops * 1e12
        results["train"] = {"seconds": step_s, "tokens_per_s": tokens / step_s, "tflops": 3 * fwd_flops / step_s / 1e12,
                            "mfu": 3 * fwd_flops / step_s / peak, "micro_batches": metrics["micro_batches"]}
        results["logprob"] = {"seconds": lp_s, "tokens_per_s": tokens / lp_s, "tflops": fwd_flops / lp_s / 1e12,
                              "mfu": fwd_flops / lp_s / peak}
        v_s = vgpo_seconds(args.vgpo_batch, args.vgpo_tokens, device, args.repeats, warmup=not args.smoke)
        results["vgpo"] = {"seconds": v_s, "fraction_of_step": v_s / step_s,
                           "shape": [args.vgpo_batch, args.vgpo_tokens]}
        e_s, nbytes = export_seconds(actor, args.repeats, warmup=not args.smoke)
        results["export"] = {"seconds": e_s, "gbytes": nbytes / 1e9, "gb_per_s": nbytes / 1e9 / e_s}
    finally:
        destroy()
    results["wall_s"] = time.perf_counter() - started
    return results


def format_table(r: dict[str, Any], peak_tflops: float) -> str:
    """The one table this script prints."""
    t, lp, v, e = r["train"], r["logprob"], r["vgpo"], r["export"]
    lines = [
        f"gpu_check on {r['device']} (torch {r['torch']}; {'SMOKE, tiny shapes' if r['smoke'] else '7B-width slice'}; "
        f"{r['layers']} decoder layers, {r['hf_params'] / 1e6:.1f} M params, recompute={r['recompute']}; "
        f"{r['tokens']} tokens/step; peak memory {r['peak_memory_gib']:.1f} GiB)",
        "FLOPs: train = 6*P*T + 6*L*d*n*T, log-prob = 2*P*T + 2*L*d*n*T "
        f"(P={r['matmul_params'] / 1e6:.1f} M matmul params, d={r['attn_width']}, n=sequence length); "
        f"MFU vs {peak_tflops:.0f} TFLOP/s",
        f"{'what':<34}{'seconds':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'other':>24}",
        f"{'bf16 train step (1 optimizer step)':<34}{t['seconds']:>10.3f}{t['tokens_per_s']:>12.0f}"
        f"{t['tflops']:>10.1f}{t['mfu']:>8.1%}{int(t['micro_batches']):>14d} micro-b.",
        f"{'no-grad log-prob + focus pass':<34}{lp['seconds']:>10.3f}{lp['tokens_per_s']:>12.0f}"
        f"{lp['tflops']:>10.1f}{lp['mfu']:>8.1%}{'':>24}",
        f"{'VGPO factors ' + 'x'.join(map(str, v['shape'])):<34}{v['seconds']:>10.4f}{'':>12}{'':>10}{'':>8}"
        f"{v['fraction_of_step']:>15.2%} of step",
        f"{'weight export (HF names, bf16)':<34}{e['seconds']:>10.3f}{'':>12}{'':>10}{'':>8}"
        f"{e['gb_per_s']:>13.1f} GB/s",
        f"total wall {r['wall_s']:.1f} s (setup {r['setup_s']:.1f} s)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    results = run(args)
    print(format_table(results, args.peak_tflops))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
