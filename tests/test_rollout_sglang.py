"""SGLang rollout engine (worker process) and HTTP server engine against transformers, on CPU.

One :class:`SGLangEngine` serves every check of this module except the HTTP ones (an engine start costs
15-45 s here); one HTTP server serves those. The reference is transformers' forward pass
(:meth:`HFRolloutEngine.score`, itself checked against raw transformers in ``test_rollout_hf.py``).
Weight-sync checks push the weights of a *perturbed* copy of the model (on-disk names, as
``save_pretrained`` writes them) and require the engine's logprobs to match the perturbed model after
the sync and to differ before it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from megatron_vgpo.rollout.base import RolloutRequest, SamplingParams
from megatron_vgpo.rollout.hf_backend import HFRolloutEngine
from megatron_vgpo.rollout.verify import verify_logprobs

pytestmark = pytest.mark.slow

IMAGE_TOL = 2e-3  # SGLang's vision code vs transformers' (DESIGN.md)
TEXT_TOL = 1e-4
# mem_fraction_static: SGLang's CPU memory profile counts other processes' allocations on this shared
# machine; at the platform default 0.05 a concurrent job can make it refuse to start ("no memory for the
# KV cache"). The KV pool stays capped by max_total_tokens, so a higher fraction costs nothing.
ENGINE_KWARGS = {"dtype": "float32", "random_seed": 0, "log_level": "error", "mem_fraction_static": 0.3}


def _image(color: str) -> Image.Image:
    image = Image.new("RGB", (84, 84), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill=color)
    ImageDraw.Draw(image).rectangle((50, 50, 70, 80), fill="orange")
    return image


def make_requests(hf: HFRolloutEngine) -> list[RolloutRequest]:
    """An image prompt given as text, and a text-only prompt given as raw ids."""
    content = [{"type": "image"}, {"type": "text", "text": "How many red shapes?"}]
    text = hf.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    plain = hf.tokenizer("Count the shapes: one two", add_special_tokens=False)["input_ids"]
    return [
        RolloutRequest("img", prompt_text=text, images=[_image("red")]),
        RolloutRequest("txt", prompt_ids=list(plain)),
    ]


def perturbed_checkpoint(base_dir: Path, out_dir: Path, seed: int) -> tuple[Path, list[tuple[str, torch.Tensor]]]:
    """A copy of ``base_dir`` with every weight moved by N(0, 0.05^2) noise: (folder, on-disk named tensors)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out_dir)
    for item in base_dir.iterdir():  # tokenizer / processor files
        if not (out_dir / item.name).exists():
            (out_dir / item.name).write_bytes(item.read_bytes())
    named = sorted(load_file(out_dir / "model.safetensors").items())
    return out_dir, named


@pytest.fixture(scope="module")
def hf_base(tiny_hf_dir: Path) -> HFRolloutEngine:
    return HFRolloutEngine(tiny_hf_dir)


@pytest.fixture(scope="module")
def prompts(hf_base: HFRolloutEngine) -> list[RolloutRequest]:
    return make_requests(hf_base)


@pytest.fixture(scope="module")
def engine(tiny_hf_dir: Path):
    from megatron_vgpo.rollout.sglang_backend import SGLangEngine

    with SGLangEngine(tiny_hf_dir, engine_kwargs=ENGINE_KWARGS) as sglang_engine:
        yield sglang_engine


def _assert_matches_reference(outputs, reference: HFRolloutEngine, prompts, temperature: float = 1.0) -> None:
    by_uid = {r.uid: r for r in prompts}
    expected = reference.score(
        [by_uid[o.uid] for o in outputs], [o.response_ids for o in outputs], temperature=temperature
    )
    for output, ref in zip(outputs, expected):
        tol = IMAGE_TOL if by_uid[output.uid].images else TEXT_TOL
        gap = (output.logprobs - ref).abs().max().item()
        assert gap < tol, (output.uid, gap)


def test_generate_greedy_sampling_and_stop(engine, hf_base: HFRolloutEngine, prompts) -> None:
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [(o.uid, o.sample_index) for o in greedy] == [("img", 0), ("txt", 0)]
    for output in greedy:
        assert output.finish_reason == "length" and len(output.response_ids) == 6
        assert output.logprobs.dtype == torch.float32 and output.logprobs.shape == (6,)
    # greedy tokens are transformers' own greedy tokens (single-prompt generate), logprobs its forward pass
    hf_greedy = hf_base.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [o.response_ids for o in greedy] == [o.response_ids for o in hf_greedy]
    _assert_matches_reference(greedy, hf_base, prompts)
    assert greedy[1].prompt_ids == prompts[1].prompt_ids

    # an extra stop token ends the response, which keeps it (with its logprob)
    stop_token = greedy[0].response_ids[2]
    stopped = engine.generate(
        prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(stop_token,))
    )
    first = greedy[0].response_ids.index(stop_token)
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].response_ids == greedy[0].response_ids[: first + 1]

    # n samples per prompt, request-major; logprobs under the sampling temperature
    params = SamplingParams(n=3, temperature=0.7, top_p=1.0, max_new_tokens=5)
    sampled = engine.generate(prompts, params)
    assert [(o.uid, o.sample_index) for o in sampled] == [(u, j) for u in ("img", "txt") for j in range(3)]
    assert all(len(o.response_ids) == len(o.logprobs) > 0 for o in sampled)
    assert len({tuple(o.response_ids) for o in sampled}) > 1
    _assert_matches_reference(sampled, hf_base, prompts, temperature=0.7)

    # control calls are harmless on CPU and generation still works afterwards
    engine.pause()
    engine.resume()
    engine.release_memory()
    engine.resume_memory()
    again = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [o.response_ids for o in again] == [o.response_ids for o in greedy]


@pytest.mark.parametrize(
    ("transport", "bucket_bytes", "seed"), [("tensor", 256_000, 1), ("distributed", 256_000, 2), ("disk", 1_000_000, 3)]
)
def test_weight_sync_transports(
    engine, prompts, tiny_hf_dir: Path, tmp_path: Path, transport: str, bucket_bytes: int, seed: int
) -> None:
    folder, named = perturbed_checkpoint(tiny_hf_dir, tmp_path / "perturbed", seed)
    actor = HFRolloutEngine(folder)
    responses = [o.response_ids for o in engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))]
    actor_logprobs = actor.score(prompts, responses)

    before = verify_logprobs(engine, prompts, responses, actor_logprobs)
    assert before.max_abs_gap > 0.05, before

    stats = engine.update_weights(iter(named), bucket_bytes=bucket_bytes, transport=transport)
    assert stats.transport == transport
    assert stats.num_tensors == len(named)
    assert stats.num_bytes == sum(t.numel() * t.element_size() for _, t in named)
    assert stats.num_buckets > 1 and stats.seconds > 0

    after = verify_logprobs(engine, prompts, responses, actor_logprobs)
    assert after.max_abs_gap < IMAGE_TOL, after
    assert after.per_sequence_max[1] < TEXT_TOL, after  # the text-only sequence
    new_greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [o.response_ids for o in new_greedy] == [
        o.response_ids for o in actor.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    ]
    _assert_matches_reference(new_greedy, actor, prompts)


def test_http_server_generate_and_sync(tiny_hf_dir: Path, hf_base: HFRolloutEngine, prompts, tmp_path: Path) -> None:
    from megatron_vgpo.distributed.multiprocess import find_free_port
    from megatron_vgpo.rollout.sglang_server import SGLangServerEngine, launch_server, stop_server

    port = find_free_port()
    server = launch_server(tiny_hf_dir, port=port, server_kwargs=ENGINE_KWARGS, log_path=tmp_path / "server.log")
    try:
        with SGLangServerEngine(
            [f"http://127.0.0.1:{port}"], model_path=tiny_hf_dir, sync_dir=tmp_path / "sync"
        ) as remote:
            greedy = remote.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=6))
            assert [(o.uid, o.sample_index) for o in greedy] == [(u, j) for u in ("img", "txt") for j in range(2)]
            _assert_matches_reference(greedy, hf_base, prompts)
            responses = [o.response_ids for o in greedy[::2]]
            for transport, seed in (("disk", 4), ("distributed", 5)):
                folder, named = perturbed_checkpoint(tiny_hf_dir, tmp_path / f"perturbed_{transport}", seed)
                actor = HFRolloutEngine(folder)
                actor_logprobs = actor.score(prompts, responses)
                assert verify_logprobs(remote, prompts, responses, actor_logprobs).max_abs_gap > 0.05
                stats = remote.update_weights(named, bucket_bytes=500_000, transport=transport)
                assert stats.num_tensors == len(named)
                after = verify_logprobs(remote, prompts, responses, actor_logprobs)
                assert after.max_abs_gap < IMAGE_TOL, (transport, after)
            with pytest.raises(ValueError, match="colocated"):
                remote.update_weights(named, transport="tensor")
    finally:
        stop_server(server)


def test_engine_start_failure_reports_the_worker_error(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """A model folder without weights: the error carries the worker's failure instead of hanging."""
    from megatron_vgpo.rollout.sglang_backend import SGLangEngine

    empty = tmp_path / "no_weights"
    empty.mkdir()
    for item in tiny_hf_dir.iterdir():
        if item.suffix != ".safetensors":
            (empty / item.name).write_bytes(item.read_bytes())
    with pytest.raises(Exception, match=r"(?s)SGLang worker.*(start|exited)") as info:
        SGLangEngine(empty, engine_kwargs=ENGINE_KWARGS, start_timeout_s=300)
    assert len(str(info.value)) > 100  # carries the worker's traceback or log tail


IN_PROCESS_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_file

def main():
    from megatron_vgpo.rollout.base import RolloutRequest, SamplingParams
    from megatron_vgpo.rollout.sglang_backend import SGLangEngine
    model_dir, perturbed_dir, out_path = sys.argv[1:4]
    named = sorted(load_file(perturbed_dir + "/model.safetensors").items())
    request = [RolloutRequest("t", prompt_ids=[5, 6, 7, 8, 9])]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
    result = {}
    kwargs = {"dtype": "float32", "random_seed": 0, "log_level": "error", "mem_fraction_static": 0.3}
    with SGLangEngine(model_dir, engine_kwargs=kwargs, in_process=True) as engine:
        out = engine.generate(request, greedy)[0]
        result["before"] = [out.response_ids, out.logprobs.tolist()]
        for transport in ("tensor", "distributed"):
            stats = engine.update_weights(iter(named), bucket_bytes=300_000, transport=transport)
            out = engine.generate(request, greedy)[0]
            result[transport] = [out.response_ids, out.logprobs.tolist(), stats.num_tensors]
    with open(out_path, "w") as f:
        json.dump(result, f)

if __name__ == "__main__":
    main()
"""


def test_in_process_hosting(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """The in-process mode (the default with CUDA), run on CPU in an interpreter started with engine_env():
    tensor and distributed syncs (the latter joins the group from a helper thread) reach the engine."""
    import json
    import subprocess
    import sys

    from megatron_vgpo.platform.sglang_cpu import engine_env

    folder, named = perturbed_checkpoint(tiny_hf_dir, tmp_path / "perturbed", seed=6)
    script = tmp_path / "in_process.py"
    script.write_text(IN_PROCESS_SCRIPT)
    out_path = tmp_path / "out.json"
    command = [sys.executable, str(script), str(tiny_hf_dir), str(folder), str(out_path)]
    proc = subprocess.run(command, env=engine_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out_path.read_text())
    request = [RolloutRequest("t", prompt_ids=[5, 6, 7, 8, 9])]
    base_ref = HFRolloutEngine(tiny_hf_dir).score(request, [result["before"][0]])[0]
    assert (torch.tensor(result["before"][1]) - base_ref).abs().max() < TEXT_TOL
    actor = HFRolloutEngine(folder)
    for transport in ("tensor", "distributed"):
        ids, logprobs, num_tensors = result[transport]
        assert num_tensors == len(named)
        reference = actor.score(request, [ids])[0]
        assert (torch.tensor(logprobs) - reference).abs().max() < TEXT_TOL, transport
    assert (actor.score(request, [result["before"][0]])[0] - base_ref).abs().max() > 0.05
