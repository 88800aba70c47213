"""The byte work of copying a live collection's folder (`fs.copy_tree_sparse`, `fs.match_tree`) in a
process of its own (`python -m visrec.fs_apart`).

In the service it stalled: no call of the embedded engine gives Python's GIL back, and a thread reading
files gives it up and takes it again on every read, each time waiting behind the request threads'
searches. A copy's settle, which holds writes, read both folders 36,000 times at 1M products: writes
were held 90 s with readers polling, 1.4-3 s without. Here nothing waits for the GIL; the service's
thread waits for one answer (docs/scale.md, "The settle in a process of its own"). Its imports are the
standard library's and `visrec.fs`: it starts in ~55 ms (Python's own start most of it), paid with
writes held."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from visrec.child import PARENT_GONE, ChildProcess, answer_channel, how_it_ended, read_request
from visrec.fs import copy_tree_sparse, match_tree

MODULE = "visrec.fs_apart"
DOING = {"copy": "copying", "match": "matching"}


def copy_apart(source: Path, target: Path) -> None:
    """`fs.copy_tree_sparse` in a process of its own; raises OSError as it does (the child's line)."""
    _run("copy", source, target)


def match_apart(source: Path, target: Path) -> int:
    """`fs.match_tree` in a process of its own: the bytes written. Raises OSError as it does (the
    child's line), or saying how the process ended if it gave no answer (killed, say)."""
    return _run("match", source, target)


def _run(operation: str, source: Path, target: Path) -> int:
    request = {"operation": operation, "source": str(source), "target": str(target)}
    answer: dict[str, Any] = {}
    with ChildProcess(MODULE, request) as child:  # a thread failing meanwhile kills it
        for message in child.messages():
            answer = message
        code = child.wait()
    written = answer.get("written")
    if code == 0 and isinstance(written, int):
        return written
    if "error" in answer:
        raise OSError(str(answer["error"]))
    raise OSError(f"the process {DOING[operation]} {source} into {target} {how_it_ended(code)}")


def _child() -> int:
    """`python -m visrec.fs_apart`: reads `{"operation": "copy"|"match", "source", "target"}` on stdin,
    answers `{"written": bytes}` or `{"error": line}` (an OSError's) on stdout; ends with its parent."""
    answers = answer_channel()
    request = read_request()
    if request is None:
        return PARENT_GONE
    source, target = Path(request["source"]), Path(request["target"])
    try:
        if request["operation"] == "copy":
            copy_tree_sparse(source, target)
            written = 0
        else:
            written = match_tree(source, target)
    except OSError as exc:
        answers.write(json.dumps({"error": str(exc)}) + "\n")
        return 1
    answers.write(json.dumps({"written": written}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child())
