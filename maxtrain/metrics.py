"""Throughput accounting (peak FLOP/s, MFU) and metric writers (JSONL, TensorBoard)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.errors import UserError

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip from vendor datasheets (no sparsity).
_PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "gh200": 989e12,
    "a100": 312e12,
    "l4": 121e12,
    "b200": 2250e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


# [m, k, n] of the probe's f32 products: squares and the tall-skinny shapes of a training
# step's projections. XLA:CPU's GEMM rate differs by shape (a 512^2 square measured 1.8x
# a 1024^2 one on the 2-core dev machine), and a peak below the rate some step shape reaches
# reports MFU above 1.
PEAK_PROBE_SHAPES = ((512, 512, 512), (1024, 1024, 1024), (2048, 512, 2048), (2048, 2048, 512), (4096, 256, 1024))


def measure_cpu_peak_flops(shapes=PEAK_PROBE_SHAPES, *, min_repeats: int = 3, seconds_per_shape: float = 0.25) -> float:
    """Best f32 FLOP/s over matmuls of `shapes` on the first CPU device (XLA runs each on all host cores).

    Each shape is timed at least `min_repeats` times and for about `seconds_per_shape`, best
    time kept: a probe timed once, at one size, or while another library's threads still spin
    (e.g. torch right before it) reads low, and every MFU measured against it reads high.
    """
    device = jax.devices("cpu")[0]
    matmul = jax.jit(lambda x, y: x @ y)
    best_rate = 0.0
    for m, k, n in shapes:
        a = jax.device_put(jnp.full((m, k), 0.5, jnp.float32), device)
        b = jax.device_put(jnp.full((k, n), 0.5, jnp.float32), device)
        matmul(a, b).block_until_ready()  # compile and warm up
        best, spent, repeats = float("inf"), 0.0, 0
        while repeats < min_repeats or spent < seconds_per_shape:
            t0 = time.perf_counter()
            matmul(a, b).block_until_ready()
            elapsed = time.perf_counter() - t0
            best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
        best_rate = max(best_rate, 2 * m * k * n / best)
    return best_rate


@functools.cache
def _cpu_peak_flops() -> float:
    """The host's measured peak, once per process (the trainer and benchmarks ask at start-up)."""
    return measure_cpu_peak_flops()


def peak_flops_total(override_per_device: float | None = None) -> float:
    """Peak FLOP/s of all devices in the run, the denominator of MFU.

    On CPU the fake devices share one host's cores, so the peak is the host's measured
    matmul rate (best over several shapes, see measure_cpu_peak_flops), not multiplied by
    the device count.
    """
    devices = jax.devices()
    if override_per_device:
        return override_per_device * (1 if devices[0].platform == "cpu" else len(devices))
    if devices[0].platform == "cpu":
        return _cpu_peak_flops()
    kind = devices[0].device_kind.lower()
    for name, flops in _PEAK_FLOPS.items():
        if name in kind:
            return flops * len(devices)
    log.warning("unknown device kind %r: MFU reported against 1e15 FLOP/s per device; set log.peak_flops", kind)
    return 1e15 * len(devices)


def require_wandb():
    """The wandb module, or a UserError naming the extra (checked before a run writes anything)."""
    try:
        import wandb
    except ImportError:
        raise UserError("log.wandb needs the wandb package; pip install 'maxtrain[wandb]' (or remove log.wandb)") from None
    return wandb


def start_wandb(cfg, run_dir: Path, config: dict | None):
    """A wandb run for `run_dir`; its id is a hash of the run dir's absolute path, so a resume continues it."""
    wandb = require_wandb()
    run_id = "mt-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, mode=cfg.mode, id=run_id,
                      resume="allow", dir=str(run_dir), config=config)


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard.

    Only the process that owns it writes; the trainer creates it on process 0 only.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb=None, config: dict | None = None):
        """wandb: a WandbConfig (None: no W&B); config: the resolved run config it records."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        self._wandb = start_wandb(wandb, Path(run_dir), config) if wandb is not None else None
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard logs (pip install tensorboardX)")
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in clean:
            prefix = "eval" if any(k.startswith("eval_") for k in clean) else "train"
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, clean["step"])

        if self._wandb is not None and "step" in clean:
            self._wandb.log({k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float))}, step=clean["step"])

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value).item()
    if isinstance(value, float):
        return round(value, 7)
    return value
