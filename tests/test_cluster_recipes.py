"""Launching at scale: pre-flight checks, the torchrun launch script, NeMo-Run recipes (local run, Slurm dry-run).

The launches are real: ``cluster/torchrun/launch.sh`` starts torchrun with 2 gloo ranks, NeMo-Run's
LocalExecutor starts torchrun through its own launcher, and the Slurm recipe is rendered by NeMo-Run itself.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_vgpo.config import load_config
from megatron_vgpo.launch import preflight, recipes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples/tiny_cpu.yaml"
# the default job trains (SFT + RL); these tests run its evaluation-only form unless they add RL steps
SMALL_JOB = ["data.synthetic.num=40", "validation.num_samples=4", "validation.max_new_tokens=4", "sft.enabled=false",
             "trainer.steps=0"]


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    from megatron_vgpo.distributed.multiprocess import find_free_port

    return find_free_port()


# ------------------------------------------------------------------------------------------------
# TrainConfig -> command
# ------------------------------------------------------------------------------------------------


def test_overrides_are_exactly_the_changed_keys_and_rebuild_the_config():
    changes = ["run_dir=/results/x y", "parallel.tp=8", "parallel.pp=2", "model.hf_dir=/models/m",
               "data.synthetic.tasks=[count_red, compare]", "logging.wandb_project=null", "logging.tensorboard=false",
               "data.min_pixels=3136", "validation.max_new_tokens=24"]  # the last equals the YAML's value
    cfg = load_config(TINY, changes)
    overrides = recipes.config_overrides(cfg, TINY)
    assert sorted(overrides) == sorted([
        "run_dir=/results/x y", "parallel.tp=8", "parallel.pp=2", "model.hf_dir=/models/m",
        "data.synthetic.tasks=[count_red, compare]", "logging.tensorboard=false", "data.min_pixels=3136"])
    assert load_config(TINY, overrides) == cfg
    # a string that YAML would read as another type is quoted
    cfg2 = load_config(TINY, ["run_dir='true'"])
    assert recipes.config_overrides(cfg2, TINY) == ["run_dir='true'"]
    assert recipes.train_args(cfg, TINY, config_path="/in/container.yaml")[0] == "/in/container.yaml"
    assert recipes.config_overrides(load_config(TINY), TINY) == []


def test_chain_tasks_commands():
    cfg = load_config(TINY, ["parallel.tp=8", "parallel.pp=2", "model.dtype=bfloat16"])
    paths = recipes.ChainPaths("/models/32b", "/results/ckpt", "/results/hf_out")
    tasks = dict(recipes.chain_tasks(cfg, TINY, paths, import_tp=8, config_path="/c/job.yaml", repo_dir="/repo"))
    assert list(tasks) == ["import", "train", "export"]
    assert tasks["import"].to_command(with_entrypoint=True) == [
        "python", "/repo/tools/convert_checkpoint.py", "import", "--hf-dir", "/models/32b", "--out", "/results/ckpt",
        "--tp", "8", "--pp", "1"]
    train = tasks["train"].to_command(with_entrypoint=True)
    assert train[:4] == ["python", "-m", "megatron_vgpo.train", "/c/job.yaml"]
    assert sorted(train[4:]) == ["model.dtype=bfloat16", "model.hf_dir=/models/32b",
                                 "model.load_checkpoint=/results/ckpt", "parallel.pp=2", "parallel.tp=8"]
    # the default job trains and saves, so the chain exports what it trained (RUN_DIR/checkpoints) ...
    assert tasks["export"].args == ["export", "--ckpt", f"{cfg.run_dir}/checkpoints", "--out", "/results/hf_out",
                                    "--tp", "8", "--pp", "1"]
    # ... and an evaluation-only job exports the imported checkpoint
    eval_only = load_config(TINY, ["parallel.tp=8", "parallel.pp=2", "trainer.steps=0", "sft.enabled=false"])
    tasks = dict(recipes.chain_tasks(eval_only, TINY, paths, import_tp=8, config_path="/c/job.yaml", repo_dir="/r"))
    assert tasks["export"].args == ["export", "--ckpt", "/results/ckpt", "--out", "/results/hf_out", "--tp", "8",
                                    "--pp", "1"]
    odd = load_config(TINY, ["run_dir=/a b", "data.train_files=[/d/t.parquet]", "data.val_files=[/d/v.parquet]"])
    plain = recipes.train_script(odd, TINY).to_command(with_entrypoint=True)
    assert "run_dir=/a b" in plain and "data.train_files=[/d/t.parquet]" in plain  # quoting is NeMo-Run's job


def test_recipes_refuse_worlds_the_layout_cannot_use():
    cfg = load_config(TINY, ["parallel.tp=8", "parallel.pp=2"])
    recipes.check_world(cfg, 4, 8)
    with pytest.raises(recipes.RecipeError, match=r"world size 24 .* not divisible by parallel.tp \(8\) x "):
        recipes.check_world(cfg, 3, 8)
    with pytest.raises(recipes.RecipeError, match="container_mounts must be HOST:CONTAINER"):
        recipes.slurm_executor(account="a", partition="p", nodes=1, gpus_per_node=8, time="1:00:00",
                               container_image="img", container_mounts=["/nocolon"], job_dir="/tmp/x")


# ------------------------------------------------------------------------------------------------
# Pre-flight
# ------------------------------------------------------------------------------------------------


def test_preflight_world_model_and_checkpoint_failures(tmp_path: Path, tiny_hf_dir: Path):
    assert preflight.check_world_size(2, 8, 8, 2) == "world 16 = TP8 x PP2 x DP1"
    with pytest.raises(preflight.PreflightError, match=r"world size 3 .* not divisible .* multiple of 2"):
        preflight.check_world_size(1, 3, 2, 1)
    with pytest.raises(preflight.PreflightError, match="tensor-parallel group must stay inside one node"):
        preflight.check_world_size(4, 4, 8, 1)
    with pytest.raises(preflight.PreflightError, match="folder not found"):
        preflight.check_model(str(tmp_path / "missing"), 1, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(preflight.PreflightError, match=r"no config\.json"):
        preflight.check_model(str(tmp_path / "empty"), 1, 1)
    message, cfg = preflight.check_model(str(tiny_hf_dir), 2, 1)
    assert "supported" in message and cfg.text_config.num_attention_heads == 4
    with pytest.raises(preflight.PreflightError, match="num_attention_heads=4 not divisible by TP=8"):
        preflight.check_model(str(tiny_hf_dir), 8, 1)
    with pytest.raises(preflight.PreflightError, match="not found on this node"):
        preflight.check_checkpoint(str(tmp_path / "ckpt"))
    with pytest.raises(preflight.PreflightError, match="neither a checkpoint"):
        preflight.check_checkpoint(str(tmp_path / "empty"))


def test_preflight_master_checks():
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(preflight.PreflightError, match=rf"master 127.0.0.1:{port} unreachable from node rank 1 "
                                                       r"after 1.5s"):
        preflight.check_master("127.0.0.1", port, node_rank=1, timeout_s=1.5)
    assert time.monotonic() - started < 10
    with pytest.raises(preflight.PreflightError, match="does not resolve"):
        preflight.check_master("no-such-host.invalid", port, node_rank=1, timeout_s=1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        busy = server.getsockname()[1]
        # the kernel completes the handshake from the listen backlog: no accept() needed
        assert preflight.check_master("127.0.0.1", busy, node_rank=1, timeout_s=5) == f"connected to 127.0.0.1:{busy}"
        with pytest.raises(preflight.PreflightError, match=f"master port {busy} is already in use on 127.0.0.1"):
            preflight.check_master("127.0.0.1", busy, node_rank=0)
    assert "is this node; port free" in preflight.check_master("127.0.0.1", _free_port(), node_rank=0)
    with pytest.raises(preflight.PreflightError, match="is not an address of this node, but node rank 0 hosts"):
        preflight.check_master("192.0.2.1", _free_port(), node_rank=0)  # TEST-NET-1: never a local address
    # c10d rendezvous: the node owning the endpoint listens, whatever its node rank
    assert "port free" in preflight.check_master("127.0.0.1", _free_port(), node_rank=3, rendezvous=True)


def test_preflight_gpu_memory_rule():
    gib = 1024**3
    h100 = ("NVIDIA H100 80GB HBM3", int(79.1 * gib))
    assert "GPU(s)" in preflight.check_gpu_memory(70 * gib, [h100] * 8, 8, "TP8 x PP2 x DP2")
    with pytest.raises(preflight.PreflightError, match=r"GPU 0 \(NVIDIA H100 80GB HBM3, 79.1 GiB\) has less memory "
                                                       r"than TP1 x PP1 x DP32 needs per GPU \(245.0 GiB"):
        preflight.check_gpu_memory(245 * gib, [h100] * 8, 8, "TP1 x PP1 x DP32")
    with pytest.raises(preflight.PreflightError, match="nproc_per_node 8 but only 2 GPU"):
        preflight.check_gpu_memory(gib, [h100] * 2, 8, "TP8")
    # the colocated SGLang share comes from the rollout config unless given
    sglang = load_config(TINY, ["rollout.backend=sglang", "rollout.engine_kwargs={mem_fraction_static: 0.4}"])
    assert preflight.sglang_fraction(sglang, None) == 0.4 and preflight.sglang_fraction(sglang, 0.1) == 0.1
    assert preflight.sglang_fraction(load_config(TINY, ["rollout.backend=hf"]), None) == 0.0


def test_launch_script_refuses_before_launching(tmp_path: Path):
    script = REPO / "cluster/torchrun/launch.sh"
    proc = subprocess.run([str(script), "--nproc-per-node", "3", str(TINY), f"run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "world size 3 (nnodes 1 x nproc_per_node 3) is not divisible" in proc.stderr
    assert "pre-flight failed" in proc.stderr and not (tmp_path / "run").exists()
    proc = subprocess.run([str(script), "--nnodes", "2", "--node-rank", "1", "--master-port", str(_free_port()),
                           "--connect-timeout", "1", "--nproc-per-node", "2", str(TINY),
                           f"model.hf_dir={tmp_path / 'nowhere'}"],
                          capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "folder not found on this node" in proc.stderr and "unreachable from node rank 1" in proc.stderr
    proc = subprocess.run([str(script), "--node-rank", "2", str(TINY)], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 2 and "must be below --nnodes 1" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Real launches
# ------------------------------------------------------------------------------------------------


def test_launch_script_runs_the_job_on_two_gloo_ranks(tmp_path: Path):
    """One node, ``--nproc-per-node 2``: the TP2+SP parity check and one RL step (GRPO, transformers rollouts)
    with a real actor update on the two gloo ranks."""
    run_dir = tmp_path / "run"
    rl_step = ["trainer.steps=1", "optimizer.warmup_steps=0", "trainer.prompts_per_step=2", "rollout.n=2",
               "rollout.backend=hf", "rollout.max_new_tokens=4", "trainer.mini_batches=1", "trainer.val_every=0",
               "trainer.save_every=0",
               "algorithm.name=grpo"]
    proc = subprocess.run([str(REPO / "cluster/torchrun/launch.sh"), "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), str(TINY), f"run_dir={run_dir}", *SMALL_JOB, *rl_step],
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight: world size  ok   world 2 = TP2 x PP1 x DP1" in proc.stdout
    assert "torch.distributed.run --nnodes 1 --nproc-per-node 2 --node-rank 0" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_prompts"] == 36 and summary["val_prompts"] == 4 and summary["steps"] == 1
    parity = summary["megatron_parity"]
    assert parity["layout"] == "tp2_pp1_sp" and parity["rope_ids_equal"]
    assert parity["logits_max_abs_diff"] < 1e-4 and parity["final_hidden_max_abs_diff"] < 1e-4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["step"] == 1 and "actor/steps" in r)
    assert step["actor/steps"] == 1 and step["actor/tokens"] > 0


def test_launch_script_two_nodes_on_one_host(tmp_path: Path):
    """Two "nodes" (node ranks 0 and 1, one process each) on this host: PP2 across the nodes. Node 1's
    pre-flight waits for node 0's rendezvous to accept connections, then both join one world."""
    run_dir, port = tmp_path / "run", _free_port()
    job = [str(TINY), f"run_dir={run_dir}", "parallel.tp=1", "parallel.sp=false", "parallel.pp=2", *SMALL_JOB]

    def node(rank: int) -> subprocess.Popen:
        return subprocess.Popen([str(REPO / "cluster/torchrun/launch.sh"), "--nnodes", "2", "--node-rank", str(rank),
                                 "--nproc-per-node", "1", "--master-port", str(port), "--connect-timeout", "120",
                                 *job], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                cwd=tmp_path)

    nodes = [node(0), node(1)]
    outs = [p.communicate(timeout=600) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    assert f"preflight: master      ok   127.0.0.1:{port} is this node; port free" in outs[0][0]
    assert f"preflight: master      ok   connected to 127.0.0.1:{port}" in outs[1][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["megatron_parity"]["layout"] == "tp1_pp2"
    assert summary["megatron_parity"]["logits_max_abs_diff"] < 1e-4 and summary["megatron_parity"]["rope_ids_equal"]


def test_nemo_run_local_chain_import_train_export(tmp_path: Path, tiny_hf_dir: Path):
    """LocalExecutor: import (HF -> Megatron at TP2) -> train from the imported checkpoint (torchrun, 2 gloo
    ranks, one RL step that saves a checkpoint) -> export of the trained checkpoint (-> HF)."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    run_dir, ckpt, export = tmp_path / "run", tmp_path / "ckpt", tmp_path / "hf_export"
    rl_step = ["trainer.steps=1", "optimizer.warmup_steps=0", "trainer.prompts_per_step=2", "rollout.n=2",
               "rollout.backend=hf", "rollout.max_new_tokens=4", "trainer.mini_batches=1", "trainer.val_every=0",
               "trainer.save_every=1",
               "algorithm.name=grpo", "algorithm.entropy_coef=0.01", "optimizer.lr=1e-3",  # entropy: a non-zero grad
               "optimizer.lr_schedule=constant"]  # a 1-step cosine would take its only step at min_lr
    proc = subprocess.run([sys.executable, str(REPO / "cluster/nemo_run/local.py"), str(TINY), f"run_dir={run_dir}",
                           *SMALL_JOB, *rl_step, "--chain", "--hf-dir", str(tiny_hf_dir), "--ckpt", str(ckpt),
                           "--export-dir", str(export), "--import-tp", "2"],
                          capture_output=True, text=True, env=_env(), timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    states = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("states: "))
    assert states == {"import": "SUCCEEDED", "train": "SUCCEEDED", "export": "SUCCEEDED"}
    assert (ckpt / "vgpo_checkpoint.json").is_file() or (ckpt / "latest").is_file()  # the import's output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model_dir"] == str(tiny_hf_dir) and summary["steps"] == 1
    # the train task started from the imported Megatron checkpoint, not from the HF folder again
    assert summary["load_checkpoint"].startswith(str(ckpt)), summary["load_checkpoint"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["load_checkpoint"] == str(ckpt)
    assert summary["megatron_parity"]["layout"] == "tp2_pp1_sp"
    assert (run_dir / "checkpoints/latest").read_text().strip() == "iter_0000001"
    # torchrun really started two ranks (torchelastic keeps one log folder per local rank)
    rank_dirs = {p.name for p in (run_dir / "nemo_run").rglob("attempt_0/*") if p.is_dir()}
    assert rank_dirs == {"0", "1"}
    # export wrote the TRAINED weights: every source tensor is there with its shape, and training moved them
    source = {k: v for f in sorted(tiny_hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    exported = {k: v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert exported.keys() == source.keys()
    assert all(exported[k].shape == source[k].shape for k in source)
    assert max(float((exported[k] - source[k]).abs().max()) for k in source) > 1e-5
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_nemo_run_reports_a_failed_job(tmp_path: Path):
    """NeMo-Run does not raise when the job fails: the driver reads the state and exits 1."""
    proc = subprocess.run([sys.executable, str(REPO / "cluster/nemo_run/local.py"), str(TINY),
                           f"run_dir={tmp_path / 'run'}", f"model.hf_dir={tmp_path / 'nowhere'}", *SMALL_JOB],
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 1
    assert json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("states: ")) == {"train": "FAILED"}
    assert not (tmp_path / "run/summary.json").exists()


def test_slurm_dryrun_renders_32b_on_4_nodes(tmp_path: Path):
    """The paper's 32B config on 4 nodes x 8 GPUs (TP8 x PP2 x DP2), rendered by NeMo-Run without submitting."""
    base = REPO / "examples/qwen2_5_vl_32b_virl39k_vgpo.yaml"
    overrides = ["model.hf_dir=/models/Qwen2.5-VL-32B-Instruct", "run_dir=/results/vgpo 32b",
                 "data.train_files=[/data/virl39k/train.parquet]", "data.val_files=[/data/mmk12/test.parquet]",
                 "parallel.tp=8", "parallel.pp=2"]
    options = ["--nodes", "4", "--gpus-per-node", "8", "--account", "vlm-research", "--partition", "batch",
               "--time", "06:00:00", "--image", "nvcr.io/acme/megatron-vgpo:0.1", "--mount", "/lustre/models:/models",
               "--mount", "/lustre/results:/results", "--job-dir", str(tmp_path / "jobs"),
               "--container-config", "/workspace/megatron_vgpo/examples/qwen2_5_vl_32b_virl39k_vgpo.yaml",
               "--plan-model", "qwen2.5-vl-32b", "--gpu-mem-gib", "80", "--dryrun"]
    driver = [sys.executable, str(REPO / "cluster/nemo_run/slurm.py"), str(base)]
    proc = subprocess.run([*driver, *overrides, *options], capture_output=True, text=True, env=_env(), timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan: TP8 x PP2 x DP2:" in proc.stdout
    script = proc.stdout.split("=== sbatch train ===")[1].split("=== end train ===")[0]
    lines = script.splitlines()
    for expected in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --time=06:00:00", "#SBATCH --account=vlm-research", "#SBATCH --partition=batch",
                     "#SBATCH --job-name=vlm-research-megatron-vgpo.train"):
        assert expected in lines, expected
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--container-image nvcr.io/acme/megatron-vgpo:0.1" in srun
    assert "--container-mounts /lustre/models:/models,/lustre/results:/results," in srun
    torchrun = shlex.split(srun[srun.index("torchrun"):])  # what the shell will pass to torchrun
    assert " ".join(torchrun[:15]) == ("torchrun --rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500 --rdzv-id "
                                       f"{torchrun[6]} --nnodes 4 --nproc-per-node 8 --node-rank $SLURM_NODEID "
                                       "--tee 3")
    job = torchrun[torchrun.index("-m"):]
    container_config = "/workspace/megatron_vgpo/examples/qwen2_5_vl_32b_virl39k_vgpo.yaml"
    assert job[:3] == ["-m", "megatron_vgpo.train", container_config]
    assert set(overrides[:4]) <= set(job[3:]) <= set(overrides)  # only the keys that differ from the base YAML
    assert load_config(base, job[3:]) == load_config(base, overrides)
    # a layout that does not fit is refused before anything is rendered
    bad = subprocess.run([*driver, *overrides, "parallel.tp=1", "parallel.pp=1", "parallel.sp=false", *options],
                         capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and "TP1 x PP1 x DP32 needs" in bad.stderr and "=== sbatch" not in bad.stdout
