"""What a forked DataLoader worker copies of the dataset's path table: a list of str against
labelflow.loaders.PathColumn (one byte buffer and offsets).

    python benchmarks/fork_memory.py                 # 1,000,000 paths
    python benchmarks/fork_memory.py --paths 200000

For each storage, the parent builds the table of relative paths (like
``class_042/image_0012345_some_longer_name.jpg``), freezes its objects (gc.freeze, as a job
that has finished importing), then forks a child that reads every path once, as a worker
process does over the epochs of a persistent loader, and reports how much the child's private
memory grew (Private_Clean + Private_Dirty of /proc/self/smaps_rollup, Linux). Reading a str
from a list writes its reference count, so the page that holds it becomes the child's own
copy; PathColumn's bytes are only read, so they stay shared with the parent. Deterministic up
to the allocator: the figure is memory, not time, and does not depend on load.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

from labelflow.loaders import PathColumn


def private_bytes() -> int:
    """This process's private memory (pages not shared with its parent), in bytes."""
    fields = {}
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Private_Clean", "Private_Dirty"):
                fields[name] = int(rest.split()[0]) * 1024
    return sum(fields.values())


def child_growth(table) -> int:
    """Bytes of private memory a forked child adds by reading every entry of ``table`` once."""
    gc.collect()
    gc.freeze()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read every path, report, leave without cleanup
        os.close(read_end)
        before = private_bytes()
        total = sum(len(table[i]) for i in range(len(table)))
        grown = private_bytes() - before
        os.write(write_end, f"{grown} {total}\n".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        grown = int(answer.read().split()[0])
    os.waitpid(pid, 0)
    gc.unfreeze()
    return grown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, default=1_000_000, help="rows in the table (default 1,000,000)")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/smaps_rollup"):
        sys.exit("fork_memory needs Linux (/proc/self/smaps_rollup)")
    paths = [f"class_{i % 100:03d}/image_{i:07d}_some_longer_name.jpg" for i in range(args.paths)]
    for name, table in (("list of str", list(paths)), ("PathColumn", PathColumn(paths))):
        grown = child_growth(table)
        print(f"{name}: {args.paths:,} paths; a forked worker reading each once copies {grown / 2**20:.1f} MiB "
              f"({grown / args.paths:.1f} bytes per path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
