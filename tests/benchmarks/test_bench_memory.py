"""The memory benchmark's page split (shared / copied / new against a forked process's ancestors),
checked on a real fork whose writes are known."""

from __future__ import annotations

import mmap
import os

from benchmarks.bench_memory import PAGE, page_origins, present_frames

WRITTEN, UNTOUCHED, NEW = 512, 1024, 256  # pages: 2 MiB written after the fork, 4 MiB not, 1 MiB new


def test_a_forked_child_s_pages_are_split_into_shared_copied_and_new() -> None:
    inherited = mmap.mmap(-1, (WRITTEN + UNTOUCHED) * PAGE)
    inherited.write(b"p" * len(inherited))  # present in the parent before the fork
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write to the first WRITTEN pages, map NEW pages of its own
        try:
            for i in range(WRITTEN):
                inherited[i * PAGE] = ord("c")
            own = mmap.mmap(-1, NEW * PAGE)
            own.write(b"n" * len(own))
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        parent = present_frames(os.getpid())
        got = page_origins(pid, [parent] if parent is not None else [])
        if parent is None:  # not root: the kernel hides frame numbers, and the split says so
            assert got is None
            return
        assert got is not None
        mib = PAGE / 2**20
        # The interpreter writes a few pages of its own after a fork: at least what the test wrote.
        assert got["copied"] >= WRITTEN * mib - 0.1
        assert got["new"] >= NEW * mib - 0.1
        assert got["shared"] >= UNTOUCHED * mib - 0.1
    finally:
        os.write(done_w, b"1")
        os.waitpid(pid, 0)
