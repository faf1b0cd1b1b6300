"""Host memory: XLA:CPU's per-step buffers on transparent huge pages (Linux, glibc >= 2.35).

XLA:CPU gives each execution one block for all of its temporaries (353 MB for the demo
step) and frees it when the execution ends. glibc serves a block that large with a fresh
mmap, so every step page-faults the whole block in and has the kernel zero it, 4 KiB at a
time: 86,000 faults and ~15% of the step's CPU time on 2 cores. Where the kernel hands out
huge pages on request (`transparent_hugepage=madvise`, the usual default), glibc's
`glibc.malloc.hugetlb=1` tunable asks for them on such blocks: ~150x fewer faults, and
fewer TLB misses in the step's memory-bound loops (benchmarks/train_throughput.py).

glibc reads tunables only when a process starts, so the command line re-executes itself
once with the tunable set, before it imports anything heavy: same PID, same arguments,
same environment plus the tunable. `MAXTRAIN_HUGEPAGES=0` turns this off.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

OPT_OUT = "MAXTRAIN_HUGEPAGES"  # "0": leave malloc alone
TUNABLE = "glibc.malloc.hugetlb"
_SETTING = f"{TUNABLE}=1"  # huge pages for the allocator's mmapped blocks
_REEXECUTED = "_MAXTRAIN_REEXECUTED"  # set for the re-executed process: never a second exec
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_OWN_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")  # LD_PRELOADed allocators keep freed memory already


def thp_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never), or None if it has none."""
    try:
        match = re.search(r"\[(\w+)\]", Path(path).read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def glibc_version() -> tuple[int, ...] | None:
    """(major, minor) of the running glibc, or None under another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def hugepage_environ(environ: Mapping[str, str], thp: str | None, glibc: tuple[int, ...] | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None where that would change nothing or is unwanted.

    None when: the user opted out; huge pages are already on for everything (`always`) or off
    (`never`); glibc is older than 2.35 (no such tunable) or absent; the tunable is already set;
    an allocator of its own is preloaded; or this process is the re-executed one.
    """
    preload = environ.get("LD_PRELOAD", "")
    if (
        environ.get(OPT_OUT) == "0" or _REEXECUTED in environ or thp != "madvise"
        or glibc is None or glibc < (2, 35) or any(lib in preload for lib in _OWN_ALLOCATORS)
    ):  # fmt: skip
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{_SETTING}" if tunables else _SETTING, _REEXECUTED: "1"}


def reexec_with_hugepages() -> None:
    """Replace this process by itself with huge-page mallocs (see the module doc), or return if not needed.

    Call it first thing in a program's entry point: everything done before is done twice.
    """
    env = hugepage_environ(os.environ, thp_mode(), glibc_version())
    argv = getattr(sys, "orig_argv", None)  # the interpreter's own command line (Python >= 3.10)
    if env is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def hugepages_on(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process asked glibc for huge pages (for reports)."""
    return _SETTING in environ.get("GLIBC_TUNABLES", "")
