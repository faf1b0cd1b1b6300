"""Join a multi-process run: find the cluster, start `jax.distributed`, fail fast and clearly.

One process needs nothing. Several processes (one per host, or several on one machine)
find each other through a coordinator, process 0, in one of these ways:

- explicit: `distributed.coordinator/num_processes/process_id`, or the environment
  variables MAXTRAIN_COORDINATOR, MAXTRAIN_NUM_PROCESSES, MAXTRAIN_PROCESS_ID
  (launch/local.sh sets them);
- Kubernetes indexed Job or JobSet: the process id is JOB_COMPLETION_INDEX, the manifest
  sets MAXTRAIN_COORDINATOR (pod 0's stable DNS name) and MAXTRAIN_NUM_PROCESSES;
- SLURM (srun with several tasks) and Cloud TPU pods: `jax.distributed.initialize`'s own
  detection reads SLURM_* variables or the TPU metadata.

Failure handling: a process that cannot reach the coordinator stops with one line after
`init_timeout_s`; when a process dies the others are stopped by JAX's coordination service
within about `heartbeat_timeout_s` (at once when process 0 dies); a process that fails
leaves at once (`leave_now`) instead of waiting for the others at the exit barrier.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Mapping

from maxtrain.errors import UserError

if TYPE_CHECKING:
    from maxtrain.config import DistributedConfig

log = logging.getLogger("maxtrain")

ENV_COORDINATOR = "MAXTRAIN_COORDINATOR"
ENV_NUM_PROCESSES = "MAXTRAIN_NUM_PROCESSES"
ENV_PROCESS_ID = "MAXTRAIN_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins: None fields are left to jax's own cluster detection."""

    method: str  # explicit | kubernetes | slurm | tpu
    coordinator: str | None
    num_processes: int | None
    process_id: int | None


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; set it to a number") from None


def _check_coordinator(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"distributed.coordinator {address!r} is not host:port; write e.g. 10.0.0.1:8476 or node0:8476")


def detect_cluster(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> ClusterSpec | None:
    """The cluster this process belongs to, or None for a single-process run.

    Explicit settings (config, then MAXTRAIN_* variables) win; then Kubernetes
    (JOB_COMPLETION_INDEX), SLURM (SLURM_NTASKS > 1 inside srun), TPU pods (several
    TPU_WORKER_HOSTNAMES). `cfg.cluster` forces one method or `none`.
    """
    if cfg.cluster == "none":
        return None
    coordinator = cfg.coordinator or environ.get(ENV_COORDINATOR) or None
    num = cfg.num_processes if cfg.num_processes is not None else _int_env(environ, ENV_NUM_PROCESSES)
    pid = cfg.process_id if cfg.process_id is not None else _int_env(environ, ENV_PROCESS_ID)
    k8s_index = _int_env(environ, "JOB_COMPLETION_INDEX")
    # The tasks of this job step: in an sbatch script outside srun that is 1 (one process),
    # though the allocation's SLURM_NTASKS may be larger.
    slurm_tasks = (_int_env(environ, "SLURM_STEP_NUM_TASKS") or _int_env(environ, "SLURM_NTASKS")
                   or _int_env(environ, "SLURM_NPROCS") or 1)  # fmt: skip
    tpu_hosts = [h for h in (environ.get("TPU_WORKER_HOSTNAMES") or "").split(",") if h]

    method = cfg.cluster
    if method == "auto":
        if k8s_index is not None and pid is None:
            method = "kubernetes"
        elif coordinator or num is not None or pid is not None:
            method = "explicit"
        elif "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and slurm_tasks > 1:
            method = "slurm"
        elif len(tpu_hosts) > 1:
            method = "tpu"
        else:
            return None

    if method in ("explicit", "kubernetes"):
        if method == "kubernetes" and pid is None:
            pid = k8s_index
        missing = [name for name, value in (
            (f"distributed.coordinator or {ENV_COORDINATOR}", coordinator),
            (f"distributed.num_processes or {ENV_NUM_PROCESSES}", num),
            (f"distributed.process_id or {ENV_PROCESS_ID}" + (" (or JOB_COMPLETION_INDEX)" if method == "kubernetes" else ""), pid),
        ) if value is None]  # fmt: skip
        if missing:
            where = "a Kubernetes indexed Job" if method == "kubernetes" else "a multi-process run"
            raise UserError(f"{where} needs {', '.join(missing)}; set them (see launch/README.md)")
        _check_coordinator(coordinator)
        if not 0 <= pid < num:
            raise UserError(f"process id {pid} is not in [0, {num}); give each of the {num} processes a distinct id 0..{num - 1}")
        if num == 1:
            return None
        return ClusterSpec(method, coordinator, num, pid)
    if method == "slurm":
        return ClusterSpec("slurm", coordinator, num or slurm_tasks, pid if pid is not None else _int_env(environ, "SLURM_PROCID"))
    return ClusterSpec(method, coordinator, num, pid)  # tpu: jax reads the TPU metadata


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Block until something listens on the coordinator's host:port; UserError after timeout_s.

    JAX's own client aborts the process with a stack trace when the coordinator never
    answers; probing first turns the common mistakes (wrong address, process 0 not
    started, a firewall) into one line.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, max(timeout_s, 0.1))):
                return
        except OSError as e:  # refused (not started yet), unknown host, unreachable
            error = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise UserError(
        f"the coordinator {address} did not answer within {timeout_s:.0f} s ({error}); start process 0 there, "
        f"check distributed.coordinator / {ENV_COORDINATOR} and that the port is open (distributed.init_timeout_s waits longer)"
    )


def initialize(cfg: DistributedConfig) -> ClusterSpec | None:
    """Start the JAX distributed runtime when this is a multi-process run (before any jax use).

    Returns the ClusterSpec, or None for a single process (nothing is started). On CPU the
    collectives go over gloo. Processes other than 0 log warnings only.
    """
    spec = detect_cluster(cfg)
    import jax

    if spec is None or jax.distributed.is_initialized():
        return spec
    # Harmless for GPU/TPU backends; CPU cross-process collectives need it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    started = time.monotonic()
    if spec.coordinator is not None and spec.process_id not in (None, 0):
        wait_for_coordinator(spec.coordinator, cfg.init_timeout_s)
    who = f"process {spec.process_id if spec.process_id is not None else '?'} of {spec.num_processes or '?'}"
    log.info("%s (%s) joining coordinator %s; waiting up to %d s for all processes",
             who, spec.method, spec.coordinator or "(detected)", cfg.init_timeout_s)  # fmt: skip
    remaining = max(1, int(cfg.init_timeout_s - (time.monotonic() - started)))
    jax.distributed.initialize(
        coordinator_address=spec.coordinator,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        cluster_detection_method="slurm" if spec.method == "slurm" else None,
        initialization_timeout=remaining,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
        shutdown_timeout_seconds=cfg.shutdown_timeout_s,
    )
    # The coordinator's count wins silently inside jax; a process started with another
    # count is a launch mistake that would otherwise show up much later as a hang.
    if spec.num_processes is not None and jax.process_count() != spec.num_processes:
        raise UserError(
            f"this process was started with num_processes={spec.num_processes} but the coordinator "
            f"{spec.coordinator} runs {jax.process_count()}; start every process with the same count"
        )
    if jax.process_index() != 0:
        log.setLevel(logging.WARNING)  # one process speaks for the run
    log.info("distributed: %d processes, %d devices (%d local); a dead process stops the others within ~%d s",
             jax.process_count(), jax.device_count(), jax.local_device_count(), cfg.heartbeat_timeout_s)  # fmt: skip
    return spec


def is_multi_process() -> bool:
    """True when this process is one of several (jax.distributed is running)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def max_over_processes(value: int) -> int:
    """The largest `value` any process passed (every process must call this)."""
    if not is_multi_process():
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def describe_failure(error: BaseException) -> str:
    """One line for an exception that ends one process of a multi-process run."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lost = ("gloo", "connection reset", "socket closed", "unavailable", "heartbeat", "broken pipe")
    if any(word in str(error).lower() for word in lost):
        return f"lost contact with another process ({text[:200]}); it probably died: see its log"
    return f"{type(error).__name__}: {text[:300]}"


def leave_now(code: int) -> int:
    """Exit a multi-process run at once with `code`; return `code` unchanged in a single process.

    A failed process that exited normally would wait at jax's shutdown barrier (up to
    shutdown_timeout_s) while its peers wait in a collective for it; leaving at once lets
    the coordination service stop them within the heartbeat timeout.
    """
    if not is_multi_process():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
