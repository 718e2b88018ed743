"""Multi-node launch on loopback: 2 "nodes" x 1 process started by torchrun (static rendezvous), FSDP2 with hybrid
sharding (shard inside a node, replicate across nodes), 2 training steps on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests._scale import FSDP, QUICKSTART, checkpoint_meta, env, free_port, tiny_run_config

pytestmark = pytest.mark.slow


def _torchrun(node_rank: int, port: int, config: Path, environ: dict[str, str]) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1", f"--master-port={port}",
        "-m", "samlight.cli.main", "fit",
        "--config", str(QUICKSTART), "--config", str(FSDP), "--config", str(config),
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=2",
        "--trainer.precision=32-true", "--config", str(config.with_name("hybrid.yaml")),
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_on_loopback_train(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    config = tiny_run_config(tmp_path, ckpt_dir=ckpts, max_steps=2)
    hybrid = {
        "reshard_after_forward": True,
        "hybrid": True,
        "mp_param_dtype": "auto",
        "activation_checkpointing": True,
    }
    config.with_name("hybrid.yaml").write_text(yaml.safe_dump(
        {"trainer": {"strategy": {"class_path": "samlight.scale.strategy.FSDP2Strategy", "init_args": hybrid}}}
    ))
    environ = env(tmp_path / "cache")
    port = free_port()
    nodes = [_torchrun(rank, port, config, environ) for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{output[-5000:]}"
    assert "GLOBAL_RANK: 1" in outputs[1] or "GLOBAL_RANK: 1" in outputs[0]
    assert checkpoint_meta(ckpts / "last.ckpt")["global_step"] == 2
    # One shard file per rank: both "nodes" wrote their part of the sharded checkpoint.
    assert len(list((ckpts / "last.ckpt").glob("*.distcp"))) == 2
