"""A pytest plugin for the mutation habit (`scripts/mutation.sh`; `[tool.mutmut]` in pyproject.toml loads
it with `-p tests.mutation_plugin`): which of the tests mutmut picked run against a mutant, and in what
order. Inert outside a mutant's run (mutmut names the mutant in MUTANT_UNDER_TEST).

mutmut runs, against each mutant, the tests that reached the mutated function in its stats run, and stops
at the first failure (`-x`). Two things here:

- The address policy is judged by its own tests. Every fetch goes through `check_url`, so mutmut ran each
  of its mutants (`_check_url`, `is_public`, `_numeric_ipv4`, …) against every fetch test as well: 180
  tests, 26 s, for a mutant that survives. Those fetch tests (`tests/test_fetch.py`,
  `tests/test_fetch_bombs.py`) test the fetcher, through allowed hosts; `tests/test_urls.py` (each
  refusal word for word, the IANA tables, Hypothesis) and `tests/test_fetch_refusals.py` (the policy as
  a fetch applies it) test the policy, and still run (7.6 s). The fetcher's own mutants still run them.
- Fastest first: mutmut's fork server hands the tests over as a set, in no set order, so a mutant the
  first fast test kills could wait behind every slow one. They are sorted by the durations mutmut
  measured in its stats run (`mutmut-stats.json`, in the folder it runs the tests from). A mutant that
  survives runs them all either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Mutants of a module (name prefix) do not run the tests of these files.
NOT_FOR = {"visrec.urls.": ("tests/test_fetch.py::", "tests/test_fetch_bombs.py::")}


def _durations() -> dict[str, float]:
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return {}
    return {str(k): float(v) for k, v in durations.items()}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:
        return
    skipped = tuple(f for prefix, files in NOT_FOR.items() if mutant.startswith(prefix) for f in files)
    if skipped:
        deselected = [item for item in items if item.nodeid.startswith(skipped)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.nodeid.startswith(skipped)]
    durations = _durations()
    # A test with no measured duration (none should lack one) goes last.
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
