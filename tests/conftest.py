"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

Tests use tiny models whose runtime is dominated by XLA compilation; LLVM -O0 compiles
about 3x faster and keeps results exact, so the suite stays inside the CI budget.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
