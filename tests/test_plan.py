"""Fit check: per-device parameter and optimizer bytes shrink by the fsdp degree; FLOPs per step
follow the analytic count; the CLI re-runs itself on the requested number of fake devices."""

import subprocess
import sys

import jax
import pytest

from maxtrain.config import load_config
from maxtrain.errors import UserError
from maxtrain.plan import format_plan, plan_run

TINY = ["model=tiny-llama", "train.seq_len=32", "train.global_batch=8"]


def test_per_device_params_shrink_by_the_fsdp_degree():
    reports = {}
    for fsdp in (1, 8):
        cfg = load_config(None, [*TINY, f"mesh.fsdp={fsdp}"])
        reports[fsdp] = plan_run(cfg, target="cpu", devices=jax.devices()[:fsdp], compile=fsdp == 8)
    full = reports[1]
    assert full["params_bytes_per_device"] == full["params_bytes"] == 4 * full["param_count"]
    for fsdp in (8,):
        r = reports[fsdp]
        # tiny-llama's dims all divide 8, and the (tiny) norm scales stay replicated.
        assert full["params_bytes_per_device"] / r["params_bytes_per_device"] == pytest.approx(fsdp, rel=0.03)
        assert full["optimizer_bytes_per_device"] / r["optimizer_bytes_per_device"] == pytest.approx(fsdp, rel=0.03)
        assert r["batch_bytes_per_device"] * fsdp == full["batch_bytes_per_device"]
        assert r["temp_bytes_per_device"] > 0 and r["flops_per_step_xla"] > 0
    assert full["flops_per_step_analytic"] == pytest.approx(
        load_config(None, TINY).model.flops_per_token(32) * 8 * 32)
    text = format_plan(reports[8], memory_gib=1.0)
    assert "params" in text and "fits in 1 GiB" in text


def test_tensor_parallel_and_bf16_target():
    cfg = load_config(None, [*TINY, "mesh.fsdp=1", "mesh.tensor=4"])
    r = plan_run(cfg, target="gpu", devices=jax.devices()[:4], compile=False)
    assert r["compute_dtype"] == "bfloat16" and r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
    # Heads, kv heads (2 of them: replicated on 4), MLP and vocab split; norms and embedding rows not.
    assert r["params_bytes_per_device"] < r["params_bytes"] / 2


def test_mesh_that_does_not_divide_the_devices_is_a_user_error():
    cfg = load_config(None, [*TINY, "mesh.fsdp=3"])
    with pytest.raises(UserError, match="devices"):
        plan_run(cfg, devices=jax.devices()[:8])


@pytest.mark.slow
def test_cli_plans_on_more_devices_than_this_process_has():
    """`maxtrain plan --devices 16` re-runs itself with 16 fake devices (this process has 8)."""
    out = subprocess.run(
        [sys.executable, "-m", "maxtrain.cli", "plan", *TINY, "train.global_batch=16", "--devices", "16",
         "--memory-gb", "80"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 16 devices (data=1 x fsdp=16 x tensor=1)" in out.stdout
    assert "fits in 80 GiB" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "maxtrain.cli", "train", *TINY, "--dry-run"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "pass --devices N" in bad.stderr
