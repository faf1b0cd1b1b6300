"""Throughput accounting (peak FLOP/s, MFU) and metric writers (JSONL, TensorBoard)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` f32 FLOP/s of an n x n matmul on the first CPU device (uses all host cores)."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops_total(override_per_device: float | None = None) -> float:
    """Peak FLOP/s of all devices in the run, the denominator of MFU.

    On CPU the fake devices share one host's cores, so the peak is the host's measured
    matmul rate, not multiplied by the device count.
    """
    devices = jax.devices()
    if override_per_device:
        return override_per_device * (1 if devices[0].platform == "cpu" else len(devices))
    if devices[0].platform == "cpu":
        return measure_cpu_peak_flops()
    kind = devices[0].device_kind.lower()
    for name, flops in _PEAK_FLOPS.items():
        if name in kind:
            return flops * len(devices)
    log.warning("unknown device kind %r: MFU reported against 1e15 FLOP/s per device; set log.peak_flops", kind)
    return 1e15 * len(devices)


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard.

    Only the process that owns it writes; the trainer creates it on process 0 only.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
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

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value).item()
    if isinstance(value, float):
        return round(value, 7)
    return value
