"""Huge-page mallocs for XLA:CPU's per-step buffers: when the command re-executes itself, and what it buys."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from maxtrain.hostmem import _REEXECUTED, OPT_OUT, TUNABLE, glibc_version, hugepage_environ, thp_mode

GLIBC = (2, 36)


def test_reexecutes_only_where_the_tunable_changes_something():
    env = hugepage_environ({"PATH": "/bin"}, "madvise", GLIBC)
    assert env["GLIBC_TUNABLES"] == f"{TUNABLE}=1" and env["PATH"] == "/bin"
    # Other tunables are kept; the re-executed process (marked) never executes again.
    kept = hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, "madvise", GLIBC)
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{TUNABLE}=1"
    assert hugepage_environ(env, "madvise", GLIBC) is None
    for environ, thp, glibc in [
        ({OPT_OUT: "0"}, "madvise", GLIBC),  # the user said no
        ({}, "always", GLIBC),  # every large mapping gets huge pages already
        ({}, "never", GLIBC),  # the kernel gives none
        ({}, None, GLIBC),  # not Linux, or no THP support
        ({}, "madvise", (2, 31)),  # glibc without the tunable
        ({}, "madvise", None),  # musl and friends
        ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, "madvise", GLIBC),  # the user chose a value
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "madvise", GLIBC),  # an allocator that keeps memory
    ]:
        assert hugepage_environ(environ, thp, glibc) is None, (environ, thp, glibc)


# A child that re-executes (printing its PID before and after), then times page faults of
# an XLA computation whose temporaries (~100 MB) are one block allocated per call.
_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    print(json.dumps({"pid": os.getpid()}), flush=True)
    from maxtrain.hostmem import hugepages_on, reexec_with_hugepages
    reexec_with_hugepages()
    import jax, jax.numpy as jnp
    def f(x):  # its gradient keeps three [2048, 4096] f32 temporaries: one 100 MB block, ~0.1 s a call
        a = x * x; b = x + 1.0
        m = (a * b).sum(0, keepdims=True)
        return ((a - m) * b + a * m).sum()
    x = jnp.full((2048, 4096), 0.001, jnp.float32)
    compiled = jax.jit(jax.grad(f)).lower(x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    compiled(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        compiled(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    print(json.dumps({"pid": os.getpid(), "hugepages": hugepages_on(), "temp": temp, "faults": faults}))
""")


def _child(**env) -> list[dict]:
    inherited = {k: v for k, v in os.environ.items() if k != _REEXECUTED}  # pytest may run under a re-executed process
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env={**inherited, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.skipif(
    thp_mode() != "madvise" or (glibc_version() or (0,)) < (2, 35),
    reason="needs Linux with transparent_hugepage=madvise and glibc >= 2.35",
)
def test_reexecuted_process_keeps_its_pid_and_faults_in_xla_buffers_by_huge_pages():
    first, again, run = _child(GLIBC_TUNABLES="", **{OPT_OUT: ""})  # the script's start runs twice
    assert first["pid"] == again["pid"] == run["pid"] and run["hugepages"]  # exec replaced the process in place
    _, off = _child(**{OPT_OUT: "0"})  # no second start
    assert not off["hugepages"]
    pages = run["temp"] / 4096
    assert run["temp"] == off["temp"] > 100e6
    # Without: every 4 KiB page of the temp block faults on every call. With: one fault per
    # 2 MiB page, so the temp block's faults are (nearly) all gone; the rest (the output, the
    # allocator's small blocks) is the same in both.
    assert off["faults"] > pages
    assert run["faults"] < off["faults"] - 0.9 * pages, (run["faults"], off["faults"], pages)
