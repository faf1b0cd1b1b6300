"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

Tests use tiny models whose runtime is dominated by XLA compilation; LLVM -O0 compiles
about 3x faster and keeps results exact, so the suite stays inside the CI budget. Many
tests compile the same programs again (every test that builds an experiment, every
subprocess run and its resumed twin), so the run shares one JAX persistent compilation
cache: a fresh directory per pytest run, inherited by the xdist workers and by every
`maxtrain` subprocess, removed at exit. A cache hit loads the executable an earlier cold
compile of the same program wrote, so every test still checks compiled code (the full
suite measured 20 min 7 s without it, 15-17 min with it, on the 2-core dev machine).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first pytest process; xdist workers inherit it
    _cache = tempfile.mkdtemp(prefix="maxtrain-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # -O0 compiles are short: cache them all
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    """A char-level sentencepiece tokenizer over lowercase letters, digits and space."""
    from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return SentencePieceTokenizer(train_sentencepiece([alphabet * 3 + " 0123456789"] * 50, vocab_size=64, model_type="char"))
