"""The training loop: the only room with side effects (data, logging, files, progress)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from maxtrain.checkpoint import TrainCheckpointer, init_state_from
from maxtrain.checkpoint.params import tokenizer_file_bytes, write_atomic
from maxtrain.checkpoint.resume import set_aside_previous_run, truncate_metrics
from maxtrain.checkpoint.signals import PreemptionWatcher
from maxtrain.config import RunConfig
from maxtrain.data import build_pipeline, build_tokenizer, local_rows, make_global_batch, unigram_entropy
from maxtrain.distributed import initialize as initialize_distributed, max_over_processes
from maxtrain.errors import UserError
from maxtrain.experiment import Experiment, build_experiment
from maxtrain.finetune.forgetting import build_forgetting_eval
from maxtrain.finetune.trainable import count_params, tree_bytes
from maxtrain.metrics import MetricsWriter, peak_flops_total, require_wandb

log = logging.getLogger("maxtrain")


class _Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (CI logs, files, pipes)."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool):
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        self.enabled = enabled
        self.total, self.t0, self.first = total, time.perf_counter(), initial
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            rate = {"tok_s": f"{record['tokens_per_s']:.0f}"} if "tokens_per_s" in record else {}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", **rate)
            return
        done = max(step - self.first, 1)
        eta = (time.perf_counter() - self.t0) / done * (self.total - step)
        # No throughput before a second step has been timed (the first includes compilation).
        rate = f" tokens/s {record['tokens_per_s']:.0f} mfu {record['mfu']:.3f}" if "tokens_per_s" in record else ""
        log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f%s eta %.0fs",
                 step, self.total, record["loss"], record["lr"], record["grad_norm"], rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate(exp: Experiment, batches: Iterator[dict], num_batches: int | None, *, step=None, params=None) -> dict[str, float]:
    """Held-out loss and accuracy over up to `num_batches` batches (None: all), sums divided once.

    step, params: another eval step and parameters (default: the experiment's).

    Each process builds its rows of the same global batches; a process whose rows run out
    sooner than another's pads with zero-weight batches (all agree on the largest count), so
    every process runs the same number of (collective) eval steps and the sums equal those
    of one process.
    """
    totals: dict[str, float] = {}
    limit = range(num_batches) if num_batches is not None else itertools.count()
    local_batches = [local for _, local in zip(limit, batches)]
    count = max_over_processes(len(local_batches))
    if count > len(local_batches):
        template = local_batches[0] if local_batches else None
        if template is None:
            raise UserError(f"process {jax.process_index()} has no eval batches; add eval documents or use fewer processes")
        padding = {k: np.zeros_like(v) for k, v in template.items()}  # zero loss weights: adds nothing
        if "labels" in padding:
            padding["labels"][:] = -1
        local_batches += [padding] * (count - len(local_batches))
    for local in local_batches:
        sums = jax.device_get((step or exp.eval_step)(exp.state.params if params is None else params,
                                                      make_global_batch(local, exp.batch_sharding)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    weight = max(totals.get("weight", 0.0), 1.0)
    return {
        "eval_loss": totals.get("loss_sum", float("nan")) / weight,
        "eval_accuracy": totals.get("correct", 0.0) / weight,
        "eval_tokens": int(totals.get("weight", 0)),
    }


def eval_sets(cfg: RunConfig) -> dict[str, tuple]:
    """name -> (data config, split, batches or None for all) of every validation set.

    "" is the default set (documents held out by data.eval_fraction, reported as eval_loss);
    each of eval.sets is all documents of its sources (reported as eval_loss/<name>).
    """
    sets = {}
    if cfg.data.format.rollouts:  # no held-out loss: `maxtrain eval` measures the policy
        if cfg.eval.sets:
            raise UserError("eval.sets are held-out losses, which RL runs (data.format.type=prompts) do not have; "
                            "remove them and run `maxtrain eval` on the run for exact match")
        return sets
    if cfg.data.eval_fraction > 0:
        sets[""] = (cfg.data, "eval", None if cfg.eval.batches == "all" else cfg.eval.batches)
    for name, es in cfg.eval.sets.items():
        data = cfg.data.model_copy(update={"sources": es.sources})
        sets[name] = (data, "all", None if es.batches == "all" else es.batches)
    return sets


def _key(key: str, name: str) -> str:
    """eval_loss -> eval_loss/<name> for a named set (the default set keeps the plain keys)."""
    return f"{key}/{name}" if name else key


@contextlib.contextmanager
def _saves_finish_on_error(ckpt):
    """On an error mid-run (a reward function that raises, bad data), let the checkpoint saves under
    way finish before the error propagates: nothing already written is lost or left half-written."""
    try:
        yield
    except BaseException:
        ckpt.close()
        raise


def train_batch_source(cfg: RunConfig, exp: Experiment, tokenizer, pipeline_args: dict):
    """The run's train batches: the data pipeline, or for RL (data.format.type=prompts) the rollout source."""
    if cfg.data.format.rollouts:
        from maxtrain.rl.rollouts import RolloutSource

        return RolloutSource(cfg, exp, tokenizer, rows=pipeline_args["rows"])
    return build_pipeline(cfg.data, tokenizer, split="train", seed=cfg.seed, **pipeline_args)


def _start_state(cfg: RunConfig, exp: Experiment, tokenizer, run_dir: Path, is_main: bool):
    """Resume from run_dir's latest good checkpoint, or start fresh (optionally from `init_from`).

    Returns (checkpointer, data iterator state or None). Sets exp.state. Runs before the
    metrics writer opens metrics.jsonl, which is cut back to the restored step.
    """
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.checkpoint.resume:
            set_aside_previous_run(run_dir)
        name, data = tokenizer_file_bytes(tokenizer)  # so `maxtrain export` can ship the tokenizer
        if not (run_dir / name).exists() or (run_dir / name).read_bytes() != data:
            write_atomic(run_dir / name, data)
    ckpt = TrainCheckpointer(run_dir / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=tokenizer.identity)
    restored = ckpt.restore_latest(exp.state)
    if restored is not None:
        exp.state, data_state, step = restored
        log.info("resumed from %s at step %d", ckpt.directory / str(step), step)
        if is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)
        return ckpt, data_state
    if is_main:
        set_aside_previous_run(run_dir, names=("metrics.jsonl",))  # from a run that never checkpointed
    if cfg.init_from:
        exp.state = init_state_from(exp, cfg.init_from, tokenizer)
    return ckpt, None


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg` to `cfg.steps`; returns a summary (also written to RUN_DIR/summary.json)."""
    initialize_distributed(cfg.distributed)  # before anything touches a device
    is_main = jax.process_index() == 0
    if cfg.log.wandb is not None and is_main:
        require_wandb()  # a missing optional extra is one line, before anything is built or written
    exp = build_experiment(cfg)
    tokenizer = build_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size)
    run_dir = Path(cfg.run_dir)
    pipeline_args = dict(
        seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch,
        rows=local_rows(exp.batch_sharding, cfg.train.global_batch),
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    sets = eval_sets(cfg)

    def eval_batches(name: str):
        data, split, _ = sets[name]
        return build_pipeline(data, tokenizer, split=split, seed=cfg.seed, **pipeline_args)

    for name in sets:  # a missing or empty validation source fails here, before anything is written
        eval_batches(name).close()
    ckpt, data_state = _start_state(cfg, exp, tokenizer, run_dir, is_main)
    writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        writer = MetricsWriter(run_dir, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, config=cfg.model_dump(mode="json"))

    train_batches = train_batch_source(cfg, exp, tokenizer, pipeline_args)
    if data_state is not None:
        try:
            train_batches.set_state(data_state)
        except UserError as e:
            raise UserError(f"{e} (or set checkpoint.restore_data=false to keep the weights and restart the data)") from None
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    flops_per_token = cfg.model.flops_per_token(cfg.train.seq_len)
    peak = peak_flops_total(cfg.log.peak_flops)
    n_params = cfg.model.param_count()
    # Without a held-out set, every training document once ("train" repeats forever: a tiny
    # dataset would be read over and over up to unigram_entropy's token cap).
    baseline_data, baseline_split, _ = next(iter(sets.values()), (cfg.data, "all", None))
    summary: dict[str, Any] = {"params": n_params, "peak_flops": peak}
    baseline = ""
    if not cfg.data.format.rollouts:  # rollouts have no token targets to count
        summary["unigram_entropy"] = unigram_entropy(baseline_data, tokenizer, split=baseline_split)
        baseline = f"; unigram entropy {summary['unigram_entropy']:.3f} nats"
    log.info(
        "model %s: %.2fM params, %.3g FLOPs/token; mesh %s; %d tokens/step%s",
        cfg.preset or cfg.model.family, n_params / 1e6, flops_per_token, dict(exp.mesh.shape), tokens_per_step, baseline,
    )  # fmt: skip

    # Trainable set: frozen leaves get no gradient and no optimizer state; say how much is left.
    ts = exp.trainable if exp.trainable is not None and not exp.trainable.everything else None
    trained, total = count_params(exp.state.params, ts)
    summary.update(trainable_params=trained, total_params=total, optimizer_state_bytes=tree_bytes(exp.state.opt_state))
    log.info("trainable params %d of %d (%.3f%%); optimizer state %.2f MB",
             trained, total, 100.0 * trained / max(total, 1), summary["optimizer_state_bytes"] / 2**20)
    forgetting = build_forgetting_eval(cfg, exp, tokenizer)
    start = int(jax.device_get(exp.state.step))
    progress = _Progress(cfg.log.progress, cfg.steps, start, enabled=is_main)

    def emit(record: dict[str, Any]) -> None:
        if writer is not None:
            writer.write(record)

    def report(pending, rate: float | None) -> dict[str, Any]:
        """Fetch a finished step's metrics, add throughput (None: none measured yet), write and show them."""
        record = {"step": pending[0], **{k: float(v) for k, v in jax.device_get(pending[1]).items()}, **pending[2]}
        if rate is not None:
            record.update(tokens_per_s=rate, tokens_per_s_per_device=rate / jax.device_count(), mfu=rate * flops_per_token / peak)
        emit(record)
        progress.update(pending[0], record)
        return record

    def flush_for_checkpoint(pending) -> None:
        # A checkpoint at step N must never be newer than the metrics: emit step N's record
        # now (it would come one step late), so a resumed run neither repeats nor skips it.
        if pending is not None and pending[0] % cfg.log.every == 0:
            report(pending, rates[-1] if rates else None)

    last_eval: dict[int, float] = {}

    def run_eval(step: int) -> None:
        record: dict[str, Any] = {"step": step}
        for name, (_, _, batches) in sets.items():
            with eval_batches(name) as it:
                result = evaluate(exp, it, batches)
            record.update({_key(k, name): v for k, v in result.items()})
            summary.setdefault(_key("first_eval_loss", name), result["eval_loss"])
            summary[_key("final_eval_loss", name)] = result["eval_loss"]
            if is_main:
                log.info("step %d %s %.4f %s %.3f", step, _key("eval_loss", name), result["eval_loss"],
                         _key("eval_accuracy", name), result["eval_accuracy"])
        if sets:
            last_eval.clear()
            last_eval[step] = record[_key("eval_loss", next(iter(sets)))]  # keep_best follows the first set
            emit(record)

    rates: list[float] = []
    preempted = False
    with jax.set_mesh(exp.mesh), PreemptionWatcher() as watcher, _saves_finish_on_error(ckpt):
        if cfg.eval.every and start == 0:  # a resumed run has that eval already
            run_eval(start)
        if forgetting is not None and start == 0:
            summary["forgetting_loss_before"] = forgetting(exp.state.params)
            log.info("pretraining held-out loss before finetuning %.4f", summary["forgetting_loss_before"])
        pending = None  # (step, device metrics): fetched one step late so the host never stalls the device
        last_time, last_step = None, start
        for step in range(start + 1, cfg.steps + 1):
            batch = train_batches.next_global(exp.batch_sharding, exp.state.params)
            t0 = time.perf_counter()  # jit traces and compiles inside the first call
            exp.state, metrics = exp.train_step(exp.state, batch)
            if last_time is None:  # the first step includes compilation: time it apart
                jax.block_until_ready(metrics)
                summary["compile_s"] = time.perf_counter() - t0
                last_time, last_step = time.perf_counter(), step
            if pending is not None and (pending[0] % cfg.log.every == 0):
                jax.block_until_ready(pending[1])  # the step before the one just dispatched
                now = time.perf_counter()
                if pending[0] > last_step:
                    rates.append((pending[0] - last_step) * tokens_per_step / (now - last_time))
                    last_time, last_step = now, pending[0]
                report(pending, rates[-1] if rates else None)
            pending = (step, metrics, train_batches.step_metrics())
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.steps:
                run_eval(step)
            preempted = step != cfg.steps and watcher.should_stop(step, cfg.checkpoint.preemption_sync_every)
            if step != cfg.steps and (preempted or ckpt.should_save(step)):
                flush_for_checkpoint(pending)
                pending = None
                ckpt.save(step, exp.state, train_batches.get_state(), eval_loss=last_eval.get(step))
            if preempted:
                ckpt.wait()
                log.warning("stopped by %s after step %d; checkpoint %s written; rerun the same command to resume",
                            watcher.signal_name or "a signal to another process", step, ckpt.directory / str(step))
                summary.update(preempted=True, checkpoint_step=step)
                break
        if pending is not None:
            summary["final_loss"] = report(pending, float(np.median(rates)) if rates else None)["loss"]
        if start >= cfg.steps:
            log.info("run already complete at step %d (raise steps to continue it, or --fresh to start over)", start)
        elif not preempted:
            run_eval(cfg.steps)
            if forgetting is not None:
                summary["forgetting_loss_after"] = forgetting(exp.state.params)
                log.info("pretraining held-out loss after finetuning %.4f (before %.4f)",
                         summary["forgetting_loss_after"], summary.get("forgetting_loss_before", float("nan")))
            ckpt.save(cfg.steps, exp.state, train_batches.get_state(), eval_loss=last_eval.get(cfg.steps))
    ckpt.close()
    progress.close()
    if rates:
        summary["tokens_per_s"] = float(np.median(rates))
        summary["mfu"] = summary["tokens_per_s"] * flops_per_token / peak
    if writer is not None:
        writer.close()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from maxtrain.plots import write_curves

        write_curves(run_dir)  # RUN_DIR/curves.png; one log line instead when matplotlib is missing
    return summary
