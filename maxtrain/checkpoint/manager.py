"""Training checkpoints: asynchronous orbax saves of the whole state, and restore of the latest good one.

A step dir RUN_DIR/checkpoints/<step>/ holds five items:

    params/     model weights (same layout as an export, so load_params reads it)
    opt_state/  optimizer state
    loop/       {"step", "rng"}
    data/       JSON: every process's data iterator state
    maxtrain/   JSON maxtrain.json: resolved config, model shapes, tokenizer, tokens seen, version

orbax writes a step into a temporary dir and renames it when every item is on disk, so a
numbered dir is complete; old steps are deleted only after a newer one is committed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from maxtrain.checkpoint.params import (
    META_ITEM,
    METADATA_FILE,
    PARAMS_ITEM,
    base_metadata,
    check_shapes,
)
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.checkpoint")

ITEMS = (PARAMS_ITEM, "opt_state", "loop", "data", META_ITEM)


def complete_steps(directory) -> list[int]:
    """Committed step numbers under `directory`, ascending (temporary and renamed-aside dirs excluded)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    steps = []
    for child in d.iterdir():
        if child.is_dir() and child.name.isdigit() and (child / META_ITEM / METADATA_FILE).is_file():
            steps.append(int(child.name))
    return sorted(steps)


def abstract_of(tree) -> Any:
    """ShapeDtypeStructs carrying each array's sharding: the restore target for `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _gather_json(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (one small host collective on multi-process runs)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everyone = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(everyone, lengths.reshape(-1))]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:240]}" if text else type(e).__name__


def _os_reason(e: BaseException) -> str:
    """The operating-system cause of a write failure ("No space left on device"), however it was wrapped."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    # tensorstore reports errno inside a ValueError text: "... [os_error_code='28']"
    match = re.search(r"os_error_code='(\d+)'", str(e))
    if match:
        return os.strerror(int(match.group(1)))
    return _one_line(e)


class TrainCheckpointer:
    """Saves (async) and restores training checkpoints under RUN_DIR/checkpoints.

    ccfg: the run's CheckpointConfig (every, keep, keep_best, async_save, restore_data).
    """

    def __init__(self, directory, ccfg, *, cfg, tokenizer_identity: str | None):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies

        self.directory = Path(directory).absolute()
        self.ccfg, self.cfg = ccfg, cfg
        self.tokenizer_identity = tokenizer_identity
        keep = policies.LatestN(n=ccfg.keep)
        if ccfg.keep_best:
            # reverse=True sorts by descending eval loss, and BestN keeps the tail: the lowest.
            best = policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False)
            keep = policies.AnyPreservationPolicy([keep, best])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=ccfg.async_save,
            preservation_policy=keep,
            create=True,
            cleanup_tmp_directories=True,  # half-written steps of a killed run
        )
        handlers = {
            PARAMS_ITEM: ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "loop": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            META_ITEM: ocp.JsonCheckpointHandler(filename=METADATA_FILE),
        }
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except OSError as e:
            raise UserError(f"cannot use checkpoint dir '{self.directory}': {e.strerror or e}; fix its permissions or choose another run_dir") from None
        self.last_saved: int | None = None

    # -- saving ---------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Periodic saves every `checkpoint.every` steps and a final save at the last step."""
        return (self.ccfg.every > 0 and step % self.ccfg.every == 0) or step == self.cfg.steps

    def save(self, step: int, state, data_state: dict, *, eval_loss: float | None = None) -> None:
        """Start writing `state` at `step`; returns once the arrays are copied off the devices.

        data_state: this process's data iterator state (JSON); all processes' are stored.
        """
        import orbax.checkpoint as ocp

        self.raise_if_failed()
        if step in self.manager.all_steps():
            return  # e.g. a periodic save and a preemption save of the same step
        meta = base_metadata(self.cfg, fmt="maxtrain-checkpoint", tokenizer_identity=self.tokenizer_identity)
        meta.update(
            step=step,
            tokens_seen=step * self.cfg.train.global_batch * self.cfg.train.seq_len,
            config=self.cfg.model_dump(mode="json"),
            saved_at=time.time(),
        )
        args = ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "loop": ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            "data": ocp.args.JsonSave({"process_count": jax.process_count(), "states": _gather_json(data_state)}),
            META_ITEM: ocp.args.JsonSave(meta),
        })  # fmt: skip
        metrics = {"eval_loss": float(eval_loss)} if eval_loss is not None else None
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - this save, or the previous one it waited for, failed to write
            failed = self.last_saved if self.last_saved is not None and self.last_saved not in complete_steps(self.directory) else step
            raise self._write_error(failed, e) from None
        self.last_saved = step

    def _write_error(self, step: int, e: BaseException) -> UserError:
        previous = [s for s in complete_steps(self.directory) if s != step]
        kept = f"the checkpoint at step {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        reason = _os_reason(e)
        return UserError(
            f"could not write the checkpoint at step {step} to '{self.directory}': {reason}; {kept}; "
            "free disk space or fix permissions, then rerun the same command to resume"
        )

    def raise_if_failed(self) -> None:
        """Surface an error of a background write (disk full, permissions) as one UserError."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - background write errors arrive wrapped in many types
            raise self._write_error(self._in_flight_step(), e) from None

    def _in_flight_step(self) -> int:
        return self.last_saved if self.last_saved is not None else -1

    def wait(self) -> None:
        """Block until the save in flight is committed (or raise its error)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._in_flight_step(), e) from None

    def close(self) -> None:
        """Wait for the last save, then release orbax's threads."""
        try:
            self.wait()
        finally:
            self.manager.close()

    # -- restoring ------------------------------------------------------------------------

    def restore_latest(self, state) -> tuple[Any, list[dict] | None, int] | None:
        """(state, every process's data state or None, step) from the newest good checkpoint, or None when there is none.

        `state` gives the target shapes and shardings (any mesh). A damaged checkpoint is renamed
        aside with a warning and the previous one is tried; a checkpoint of another model shape
        is a UserError (never a silent fresh start).
        """
        steps = complete_steps(self.directory)
        for step in reversed(steps):
            step_dir = self.directory / str(step)
            try:
                check_shapes(step_dir / PARAMS_ITEM, abstract_of(state.params), what=f"checkpoint step {step}")
                restored = self._restore_step(step, state)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
                self._set_aside(step_dir, e)
                continue
            return restored
        if steps:
            raise UserError(
                f"all {len(steps)} checkpoints in '{self.directory}' are damaged (moved aside as damaged-*); "
                "rerun with --fresh (checkpoint.resume=false) to start over, or restore them from a backup"
            )
        return None

    def _restore_step(self, step: int, state):
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardRestore(abstract_of(state.params)),
            "opt_state": ocp.args.StandardRestore(abstract_of(state.opt_state)),
            "loop": ocp.args.StandardRestore(abstract_of({"step": state.step, "rng": state.rng})),
            "data": ocp.args.JsonRestore(),
        })  # fmt: skip
        out = self.manager.restore(step, args=args)
        loop = out["loop"]
        restored = state.replace(params=out[PARAMS_ITEM], opt_state=out["opt_state"], step=loop["step"], rng=loop["rng"])
        data = out["data"]
        if not self.ccfg.restore_data:
            log.warning("checkpoint.restore_data=false: the data stream restarts from its beginning")
            return restored, None, step
        # Every process's state: the pipeline takes the rows it builds now, on any process count.
        return restored, data["states"], step

    def _set_aside(self, step_dir: Path, e: BaseException) -> None:
        # Renamed rather than deleted: nothing a user might want is lost, and the step number
        # is free for the re-run of those steps.
        aside = step_dir.with_name(f"damaged-{step_dir.name}-{int(time.time())}")
        log.warning("checkpoint %s is damaged (%s); moved it to %s and trying the previous one", step_dir, _one_line(e), aside.name)
        if jax.process_index() == 0:
            step_dir.rename(aside)
        self.manager.reload()
