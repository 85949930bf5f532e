#!/usr/bin/env bash
# Checks the Promela model of the migration and fence-and-recover protocols (models/ha.pml) with
# spin: each configuration below must verify, and each deliberately broken variant must produce a
# counterexample (proof that the check can fail). Exits non-zero when either expectation fails.
# `make test-model` runs it; docs/migration-protocol.md ("The model") says what is checked.
set -euo pipefail

cd "$(dirname "$0")/.."
command -v spin >/dev/null || { echo "check-model: spin is not installed (scripts/setup-host.sh installs it)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/pvc-model.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp models/ha.pml "$work/ha.pml"
cd "$work"
failed=0

# check NAME KIND EXPECT [-DMACRO...]
#   KIND: safety (I1, "never running on two nodes": ltl never_twice) or liveness (ltl
#   eventually_runs, under weak fairness); EXPECT: holds, or counterexample.
check() {
    local name=$1 kind=$2 expect=$3
    shift 3
    rm -f pan pan.* ha.pml.trail
    # -O0: gcc -O2 spends far longer on pan.c than pan spends on these bounded searches
    spin -a "$@" ha.pml >spin.log 2>&1 || { cat spin.log; echo "check-model: $name: spin -a failed"; failed=1; return; }
    if [ "$kind" = safety ]; then
        gcc -O0 -DSAFETY -DCOLLAPSE -o pan pan.c
        ./pan -N never_twice -m200000 >pan.log 2>&1 || true
    else
        # NFAIR: weak fairness over the model's 9 processes
        gcc -O0 -DCOLLAPSE -DNFAIR=4 -o pan pan.c
        ./pan -a -f -N eventually_runs -m200000 >pan.log 2>&1 || true
    fi
    local errors states
    errors=$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' pan.log | head -1)
    states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' pan.log | head -1)
    # (a search also stops, "not completed", at its first error)
    if [ -z "$errors" ] || { [ "$errors" = 0 ] && grep -q "Search not completed\|max search depth too small\|out of memory" pan.log; }; then
        cat pan.log
        echo "check-model: $name: the search did not complete"
        failed=1
        return
    fi
    if [ "$expect" = holds ] && [ "$errors" = 0 ]; then
        echo "check-model: ok   $name ($kind holds; $states states)"
    elif [ "$expect" = counterexample ] && [ "$errors" != 0 ]; then
        echo "check-model: ok   $name (broken on purpose: $kind counterexample found, as it must be)"
    else
        echo "check-model: FAIL $name: expected the $kind property to be $expect, spin found $errors error(s)"
        if [ -f ha.pml.trail ]; then
            echo "check-model: the counterexample (spin -t -p):"
            spin -t -p -g "$@" ha.pml | tail -150
        fi
        failed=1
    fi
}

# The protocols as the code has them, with the rules docs/migration-protocol.md ("The model") names,
# within bounds (FAULTS: daemon kills, session expiries, partitions, quorum losses and power losses,
# in any order and at any step; BMC_FAILURES: fences that fail; REPAIRS: powered-off nodes powered
# on again; REQUESTS, RETARGETS: migration requests, and `node` changed under one).
check "migration + fencing: one fault, a failed fence, a changed target, a repair" safety holds -DFAULTS=1
check "fencing: two faults (two nodes lost one after the other, an actor killed while fencing)" \
    safety holds -DFAULTS=2 -DREQUESTS=0 -DRETARGETS=0 -DREPAIRS=0 -DBMC_FAILURES=0
check "migration + fencing: one fault, a failed fence: the VM ends up running" \
    liveness holds -DFAULTS=1 -DREPAIRS=0 -DRETARGETS=0

# Broken on purpose: each must produce a counterexample.
check "recovery without fence" safety counterexample -DFAULTS=1 -DREQUESTS=0 -DRETARGETS=0 -DBROKEN_NO_FENCE
check "recovery that does not check the fenced node's state in its write (D4)" \
    safety counterexample -DFAULTS=1 -DREQUESTS=0 -DRETARGETS=0 -DBROKEN_RECOVERY_NO_STATE_CHECK
check "a transfer to a target that is no longer run (no D6: the rule before it)" \
    safety counterexample -DFAULTS=1 -DBROKEN_NO_D6
check "a claimed start taken back when the target's alive is gone (no D7: the rule before it)" \
    safety counterexample -DFAULTS=1 -DBROKEN_PEER_ALIVE
check "no recovery after a fence" liveness counterexample -DFAULTS=1 -DREPAIRS=0 -DRETARGETS=0 -DBROKEN_NO_RECOVERY

if [ "$failed" != 0 ]; then
    echo "check-model: FAILED"
    exit 1
fi
echo "check-model: all checks passed"
