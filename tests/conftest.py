"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

Tests use tiny models whose runtime is dominated by XLA compilation; LLVM -O0 compiles
about 3x faster and keeps results exact, so the suite stays inside the CI budget.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    """A char-level sentencepiece tokenizer over lowercase letters, digits and space."""
    from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return SentencePieceTokenizer(train_sentencepiece([alphabet * 3 + " 0123456789"] * 50, vocab_size=64, model_type="char"))
