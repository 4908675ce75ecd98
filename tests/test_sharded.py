"""Where the engine lives under each accelerate config, and sharded weights reaching it whole.

Every config in accelerate_configs/ parses and says how to launch it; FSDP2's and DeepSpeed ZeRO-3's gathering run for
real on 2 CPU ranks (each rank holds part of each weight, or none of it; policy_weights must hand the engine the exact
whole tensors); and a sharded
config launched on a CPU stops with a one-line error instead of accelerate's silent fallback to DDP (measured: with
use_cpu, accelerate drops the FSDP plugin and trains plain DDP)."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = {"cpu.yaml": "NO", "cpu_2proc.yaml": "MULTI_GPU", "single_gpu.yaml": "NO", "multi_gpu.yaml": "MULTI_GPU",
           "deepspeed_zero2.yaml": "DEEPSPEED", "deepspeed_zero3.yaml": "DEEPSPEED", "fsdp2.yaml": "FSDP",
           "multi_node.yaml": "MULTI_GPU"}


@pytest.mark.unit
@pytest.mark.parametrize("name,kind", CONFIGS.items())
def test_every_accelerate_config_parses_and_says_how_to_launch(name, kind):
    path = ROOT / "accelerate_configs" / name
    cfg = load_config_from_file(str(path))
    assert str(cfg.distributed_type).split(".")[-1] == kind
    head = path.read_text().split("compute_environment")[0]
    assert head.startswith("#") and "engine" in head and (name == "cpu.yaml" or "accelerate launch" in head)
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] in (2, 3)


def test_fsdp2_shards_reach_the_engine_whole(tiny_dir):
    p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29643",
                        str(ROOT / "tests" / "_fsdp2_gather.py"), tiny_dir], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("differing: []") == 2, p.stdout


def test_zero3_partitions_reach_the_engine_whole(tiny_dir):
    p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29645",
                        str(ROOT / "tests" / "_zero3_gather.py"), tiny_dir], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("differing: []") == 2 and p.stdout.count("0 elements held locally") == 2, p.stdout


def test_tensor_parallel_engine_group_verifies_each_shard_and_names_a_stale_rank(tiny_dir):
    p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29647",
                        str(ROOT / "tests" / "_tp_colocate.py"), tiny_dir], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert out.count("gate PASS") == 2 and out.count("steps 2") == 2 and out.count("last sync ok") == 2, out
    stale = ("weight_sync FAILED: after sync #3 the engine differs from the trainer in 1 parameter group(s): rank 1 "
             "(TP group [0, 1]): model.layers.0.mlp.*.weight")
    assert out.count(stale) == 2, out  # both ranks get the group's answer, naming the stale rank


def test_sharded_config_on_a_cpu_is_a_one_line_error(tmp_path):
    with socket.socket() as sock:  # a free port: the default 29500 may still be held by an earlier launch
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items()  # not the rank variables an in-process engine of this session set
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file", "accelerate_configs/fsdp2.yaml",
                        "--num_processes", "2", "--main_process_port", str(port), "--mixed_precision", "no",
                        "-m", "trl_correct.train", "--config", "recipes/tiny.yaml", "--output_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0
    lines = [re.sub(r"^\[rank\d+\]: ", "", x) for x in p.stderr.splitlines()]
    line = next((x for x in lines if x.startswith("trl-correct train: distributed_type=FSDP is invalid")), None)
    assert line is not None, p.stderr[-3000:]
    assert "cpu_2proc.yaml" in line
