#!/usr/bin/env bash
# The mutation habit (docs/reliability.md, "Mutation testing"): mutmut mutates the trust-critical
# functions below, one change at a time, and runs against each mutant the fast tests that reach it
# ([tool.mutmut] in pyproject.toml lists them). A mutant the tests do not kill is a change to the code that
# no test notices: kill it with a test, or record why it is equivalent. Not in CI. The whole scope (967
# mutants) takes 13-18 minutes on a shared 2-core machine, by its load (38 before the pytest options and
# tests/mutation_plugin.py that [tool.mutmut] names: a mutant's pytest session cost 3 s before its first
# test, and the address policy's mutants ran every fetch test); pass globs to run a part.
# Starts from scratch each run (mutmut's cache can keep stale test mappings).
#
#   scripts/mutation.sh                      # the whole scope below
#   scripts/mutation.sh 'visrec.guard.*'     # mutant-name globs of your own
#   VENV=/path/to/venv scripts/mutation.sh   # an existing environment with mutmut (skips set-up)
#
# Results: `mutants/` (browse them with `mutmut browse`, show one with `mutmut show NAME`),
# mutants/summary.txt: each mutant's status, then the counts; mutants/durations.txt: each mutant's time.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VENV:-}" ]; then
  EXTRAS=test,mutation scripts/setup.sh
  VENV=.venv
fi
# Mutant names: module.x_function__mutmut_N, module.xǁClassǁmethod__mutmut_N.
SCOPE=(
  # The address policy: which URLs and hosts a fetch may reach.
  'visrec.urls.x_is_url__*' 'visrec.urls.x_is_public__*' 'visrec.urls.x_in_networks__*'
  'visrec.urls.x__ipv4_number__*' 'visrec.urls.x__numeric_ipv4__*' 'visrec.urls.x_check_url__*'
  'visrec.urls.x__check_url__*' 'visrec.urls.xǁFetchPolicyǁfrom_settings__*'
  # The fetch guard's checks: the policy before each hop, redirects, status, sizes, decoding bombs.
  'visrec.fetch.x__check_location__*' 'visrec.fetch.xǁFetcherǁfetch__*' 'visrec.fetch.xǁFetcherǁ_follow__*'
  'visrec.fetch.xǁFetcherǁ_read__*' 'visrec.fetch.xǁ_Decodingǁ*' 'visrec.fetch.xǁ_Layerǁ*'
  # The plan's hashes: what decides that a product changed (re-embedded, rewritten) or not.
  'visrec.plan.x_bookkeeping__*' 'visrec.plan.x_metadata_hash__*' 'visrec.plan.x_photo_files__*'
  'visrec.plan.x__sha256_file__*' 'visrec.plan.x_legacy_content_hash__*'
  # The delete guard, the write key, the quality gate.
  'visrec.ingest.x__check_deletes__*' 'visrec.api.writes.x_writes_of__*' 'visrec.evaluation.x_worse_by__*'
  # The guard's checks: keys, throttles, body limits, the routing path (not its metrics or plumbing).
  'visrec.guard.xǁGuardǁ_admit__*' 'visrec.guard.xǁGuardǁ_failed_authentication__*'
  'visrec.guard.xǁGuardǁ_rate_limit__*' 'visrec.guard.xǁGuardǁ_limit__*' 'visrec.guard.xǁGuardǁ_limited__*'
  'visrec.guard.xǁRateLimiterǁwait_s__*' 'visrec.guard.x__client__*' 'visrec.guard.x__is__*'
  'visrec.guard.x__header__*' 'visrec.guard.x__has_body__*' 'visrec.guard.x_routing_path__*'
  'visrec.guard.x__request_id__*'
)
[ $# -gt 0 ] && SCOPE=("$@")
rm -rf mutants
started=$(date +%s)
"$VENV/bin/mutmut" run --max-children "${JOBS:-2}" "${SCOPE[@]}" >mutants.log 2>&1 || {
  tail -c 4000 mutants.log >&2
  exit 1
}
mv mutants.log mutants/run.log
"$VENV/bin/mutmut" results --all true 2>/dev/null | grep -a "__mutmut_" >mutants/all.txt || true
# Only the mutants in scope (mutmut lists every mutant it made in the files, run or not).
python3 - "${SCOPE[@]}" <<'EOF' >mutants/summary.txt
import collections, fnmatch, sys
rows = [line.strip().split(": ", 1) for line in open("mutants/all.txt")]
rows = [(n, s) for n, s in rows if any(fnmatch.fnmatch(n, g) for g in sys.argv[1:])]
for name, status in sorted(rows):
    print(status, name)
counts = collections.Counter(s for _, s in rows)
print(f"in scope: {len(rows)}; " + ", ".join(f"{s}: {n}" for s, n in counts.most_common()))
EOF
# What each mutant cost a worker, slowest first (the fork server's log: log_to_file in pyproject.toml).
python3 - <<'EOF' >mutants/durations.txt
import re
status = {"0": "survived", "1": "killed"}  # else mutmut's exit code (-24: timeout)
log = open("mutants/mutmut-debug.log", errors="replace").read()
found = re.findall(r"Completed (\S+): exit=(-?\d+) \(([\d.]+)s\)", log)
for name, code, seconds in sorted(found, key=lambda f: -float(f[2])):
    print(f"{float(seconds):6.1f} s  {status.get(code, 'exit ' + code):8}  {name}")
EOF
tail -1 mutants/summary.txt
echo "took $(($(date +%s) - started)) s; survivors: grep -v killed mutants/summary.txt; slowest: head mutants/durations.txt"
