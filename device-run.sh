#!/usr/bin/env bash
# The GPU check on a lent machine, from the repository root, on the image's own python3
# with the bundle of `make device-bundle` (docs/performance.md, "On a lent GPU"):
#
#   device tool: run, command "bash device-run.sh", carry [".deps"], timeout_s 540
#   here:        make device-bundle && OUT=$(mktemp -d) bash device-run.sh --cpu-rehearsal
#
# Prints the GPU, driver, Python, torch and triton versions, then imports every module
# within 20 s (exit 3 if one fails, before anything else runs). Then each part of
# benches/gpu_check.py runs as its own process under its own time limit, each
# configuration written to $OUT/gpu-check.json as it finishes; the whole log is
# $OUT/device-run.log (only files under $OUT come back). Every part gets its share of
# 460 s plus what the parts before it left, so the run ends within 8 minutes.
# --cpu-rehearsal: the same on this CPU at the tests' tiny shapes (--smoke).
set -uo pipefail
cd "$(dirname "$0")"
: "${OUT:?set OUT to the folder whose files come back}"

# part:seconds, in running order; the seconds add up to 460
PARTS=(gpu_tests:60 kernels:40 steps:130 cuda_graphs:35 e9b:75 fused:40 fused_match:25 fused_compiled:55)
TOTAL=460
SMOKE=()
case "${1:-}" in
"") ;;
--cpu-rehearsal)
    SMOKE=(--smoke)
    TOTAL=600
    # one thread: several OpenMP threads spin against each other on a busy host
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    ;;
*)
    echo "usage: OUT=DIR bash device-run.sh [--cpu-rehearsal]" >&2
    exit 2
    ;;
esac

export PYTHONPATH=".deps:.${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the GPU tests and benches must run the compiled kernels, never the interpreter
unset TRITON_INTERPRET
RESULT="$OUT/gpu-check.json"

mark() { # part, why: a part whose process died leaves its rows "running"; say why
    python3 - "$RESULT" "$1" "$2" <<'EOF'
import json, os, sys
path, name, why = sys.argv[1:]
result = json.load(open(path)) if os.path.isfile(path) else {"parts": {}}
part = result["parts"].setdefault(name, {})
part["status"] = "died"
part["why"] = why
for row in part.values():
    if isinstance(row, dict) and row.get("status") == "running":
        row.update(status="died", why=why)
json.dump(result, open(path + ".tmp", "w"), indent=1)
os.replace(path + ".tmp", path)
EOF
}

main() {
    echo "== device-run.sh ${1:-} $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    else
        echo "nvidia-smi: not on this machine"
    fi
    # torch and triton first, untimed but for a hang: their cold start is not fastdiff's
    timeout -k 5 120 python3 -m benches.device versions || {
        echo "device-run: python3 cannot import torch and triton: nothing ran"
        return 3
    }
    timeout -k 5 20 python3 -m benches.device imports
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "device-run: the import check failed (exit $rc; 124: over 20 s): nothing ran"
        return 3
    fi
    rm -f "$RESULT"
    local failed=0 i p later limit started
    for i in "${!PARTS[@]}"; do
        local name="${PARTS[i]%%:*}"
        later=0
        for p in "${PARTS[@]:i+1}"; do later=$((later + ${p##*:})); done
        limit=$((TOTAL - SECONDS - later))
        if [ "$limit" -lt 10 ]; then
            echo "device-run: $name: no time left"
            mark "$name" "no time left of the ${TOTAL} s"
            failed=1
            continue
        fi
        echo "== $name (at most $limit s)"
        started=$SECONDS
        # the rehearsal's kernel benches run the Triton kernels in the interpreter
        local interpret=()
        [ ${#SMOKE[@]} -gt 0 ] && [ "$name" = kernels ] && interpret=(TRITON_INTERPRET=1)
        # gpu_check starts no configuration in the last 15 s; timeout ends one that overruns
        env "${interpret[@]}" timeout -k 10 "$limit" python3 -m benches.gpu_check \
            --parts "$name" --merge --out "$RESULT" --budget $((limit - 15)) "${SMOKE[@]}"
        rc=$?
        echo "device-run: $name: exit $rc after $((SECONDS - started)) s"
        if [ "$rc" -ne 0 ]; then
            failed=1
            mark "$name" "exit $rc after $((SECONDS - started)) s (124, 137: its $limit s limit)"
        fi
    done
    python3 - "$RESULT" <<'EOF'
import json, sys
for name, part in json.load(open(sys.argv[1]))["parts"].items():
    print(f"{name}: {part.get('status')} ({part.get('part_seconds', 0):.0f} s)")
EOF
    echo "device-run: done in $SECONDS s"
    return $failed
}

mkdir -p "$OUT"
main "$@" 2>&1 | tee "$OUT/device-run.log"
exit "${PIPESTATUS[0]}"
