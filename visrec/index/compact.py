"""`python -m visrec.index.compact`: optimize an embedded collection folder in a process of its own.

qdrant-edge's optimize() holds Python's GIL for its whole run: in a serving process every request
thread would wait (14-17 s after 10-20k new points at 100k products, ~30 min for a 1M build). Run here,
it stops nothing but this process; the caller opens the folder again once it exits 0. A child of
`visrec.child`: its request ({"folder", "parent"}) on stdin, its answer ({"seconds"} or {"error"}) on
stdout; it ends with the thread that started it (`child.die_with_parent`: optimize() holds the GIL, so
the watch of stdin cannot run), never optimizing on for nobody.
"""

from __future__ import annotations

import json
import os
import sys
import time

from visrec.child import PARENT_GONE, answer_channel, die_with_parent, read_request

NICENESS = 10  # maintenance gives the CPU to the service's requests and writes first


def main() -> int:
    request = read_request()
    if request is None:
        return PARENT_GONE
    die_with_parent(int(request["parent"]))
    answers = answer_channel()
    os.nice(NICENESS)
    folder = str(request["folder"])
    started = time.perf_counter()
    try:
        import qdrant_edge as qe

        shard = qe.EdgeShard.load(folder, None)
        try:
            shard.optimize()
            shard.flush()
        finally:
            shard.close()
    except Exception as exc:  # noqa: BLE001 - the engine's own errors: its message goes to the caller
        answers.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1
    seconds = time.perf_counter() - started
    answers.write(json.dumps({"seconds": seconds}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
