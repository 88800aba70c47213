"""`python -m visrec.index.compact FOLDER`: optimize an embedded collection folder in a process of its own.

qdrant-edge's optimize() holds Python's GIL for its whole run: in a serving process every request
thread would wait (14–17 s after 10–20k new points at 100k products, ~30 min for a 1M build). Run here,
it stops nothing but this process; the caller opens the folder again once it exits 0.
"""

from __future__ import annotations

import os
import sys
import time

import qdrant_edge as qe

NICENESS = 10  # maintenance gives the CPU to the service's requests and writes first


def main(folder: str) -> int:
    os.nice(NICENESS)
    started = time.perf_counter()
    shard = qe.EdgeShard.load(folder, None)
    try:
        shard.optimize()
        shard.flush()
    finally:
        shard.close()
    print(f"optimized {folder} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
