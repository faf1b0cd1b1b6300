"""Step-time overhead of an asynchronous checkpoint save, as a ratio against steps without one.

    python benchmarks/checkpoint_overhead.py [key=value ...]     (default: the demo model, S256 B8)

Times, in one process on the same machine: steps with no save in flight; the blocking part of
`save()` (device-to-host copy, which the step loop does wait for); and the steps that run while
the write is in flight. Also the time of a fully synchronous save, for comparison.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np

from maxtrain.checkpoint import TrainCheckpointer
from maxtrain.config import load_config
from maxtrain.data import make_global_batch
from maxtrain.experiment import build_experiment

sys.path.insert(0, ".")
from tests.synthetic import random_batch  # noqa: E402


def main(overrides: list[str]) -> None:
    cfg = load_config("configs/base.yaml", overrides)
    exp = build_experiment(cfg)
    batch = make_global_batch(random_batch(cfg.train.global_batch, cfg.train.seq_len, cfg.model.vocab_size, seed=0,
                                           docs_per_row=2), exp.batch_sharding)  # fmt: skip
    step_no = [0]

    def step() -> float:
        t0 = time.perf_counter()
        exp.state, metrics = exp.train_step(exp.state, batch)
        jax.block_until_ready(metrics)
        step_no[0] += 1
        return time.perf_counter() - t0

    with jax.set_mesh(exp.mesh), tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):  # compile and warm up
            step()
        plain = [step() for _ in range(8)]
        ckpt = TrainCheckpointer(f"{tmp}/async", cfg.checkpoint.model_copy(update={"async_save": True, "keep": 2}),
                                 cfg=cfg, tokenizer_identity=None)  # fmt: skip
        blocking, during = [], []
        for _ in range(4):
            t0 = time.perf_counter()
            ckpt.save(step_no[0], exp.state, {})
            blocking.append(time.perf_counter() - t0)
            first = True
            while first or ckpt.manager.is_saving_in_progress():
                during.append(step())
                first = False
            ckpt.wait()
            plain += [step() for _ in range(2)]
        ckpt.close()
        sync = TrainCheckpointer(f"{tmp}/sync", cfg.checkpoint.model_copy(update={"async_save": False, "keep": 2}),
                                 cfg=cfg, tokenizer_identity=None)  # fmt: skip
        sync_s = []
        for _ in range(2):
            t0 = time.perf_counter()
            sync.save(step_no[0], exp.state, {})
            sync.wait()
            sync_s.append(time.perf_counter() - t0)
            step()
        sync.close()
    mb = sum(x.nbytes for x in jax.tree.leaves(exp.state)) / 2**20
    base = float(np.median(plain))
    print(f"model {cfg.preset}: {cfg.model.param_count() / 1e6:.2f}M params, checkpoint {mb:.0f} MiB, "
          f"devices {jax.device_count()} ({jax.devices()[0].platform})")
    print(f"step without a save in flight: median {base * 1e3:.0f} ms over {len(plain)} steps")
    print(f"step while an async save is in flight: median {np.median(during) * 1e3:.0f} ms over {len(during)} steps "
          f"-> ratio {np.median(during) / base:.2f}")
    print(f"blocking part of an async save (device->host copy): median {np.median(blocking) * 1e3:.0f} ms "
          f"= {np.median(blocking) / base:.2f} steps")
    print(f"fully synchronous save: median {np.median(sync_s) * 1e3:.0f} ms = {np.median(sync_s) / base:.2f} steps")


if __name__ == "__main__":
    main(sys.argv[1:])
