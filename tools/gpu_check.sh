#!/usr/bin/env bash
# tools/gpu_check.sh: one command that measures fastrl on a GPU (issue 9, section 5).
#
#   tools/gpu_check.sh [OUT_DIR | --out OUT_DIR] [options]
#   tools/gpu_check.sh --dry-run --out /tmp/check     # every stage on the CPU, tiny shapes
#
# Stages, each in its own process under its own `timeout` (a hang or a crash loses only
# that stage; every stage flushes its files as it goes), all within --budget seconds:
#   env         GPU, SMs, clocks, driver, CUDA, torch/Triton/peers, TF32 -> env.json
#   smoke       every kernel and design variant once at small shapes vs fp32 -> smoke.json
#   numerics    same-weight KL, linear_logprobs vs fused_policy_loss -> results/numerics-*
#   padding     25%-valid vs all-valid GRPO batch, fwd and fwd+bwd -> results/padding-*
#   logprobs, policy
#               bench/bench_*.py: cuBLAS floor, every variant of tools/gpu_plan.py, the
#               peers (TRL, Liger, CCE, eager) at the three real heads, N = 16k/4k/1k
#               -> results/<prefix><device>-<date>.json + .png
#   gpu_tests   pytest -m gpu tests -> gpu_tests.xml (junit)
#   gae         bench/bench_gae.py: the GAE scan's tiles against a copy of the same bytes
#               (issue 14's >= 70% target) and the PyTorch loop -> results/gae-*.json + .png
#   preference  bench/bench_preference.py, likewise
#   memcheck    compute-sanitizer --tool memcheck of the smoke -> memcheck.log
#   report      headline figures -> summary.md (printed); summary.json has every stage
#   grpo_step   opt-in (only with --stages grpo_step; it needs a command of its own, with
#               --budget 560): bench/bench_grpo_step.py, one GRPO LoRA step of fastrl, TRL
#               and patched TRL at the Qwen2.5-1.5B and 7B-4bit shapes, G=8, prompt 256 +
#               completion 1024, 24 GiB cap; the +vllm rows too where `import vllm` works
#               (the device image has no vLLM) -> results/grpo_step-<stem>.json + .png
#   ppo_step    opt-in too (--stages ppo_step --budget 300): bench/bench_ppo_step.py, one PPO
#               LoRA step of fastrl at the Qwen2.5-1.5B shape (rollout 8, prompt 256 +
#               completion 1024, 24 GiB cap), the verl row where `import verl` works
#               -> results/ppo_step-<stem>.json
# If the smoke fails, memcheck runs right after it (it says where the fault is).
#
# Output: OUT_DIR holds everything (results/ is ready to copy into bench/results/). With
# --pack, and by default when OUT_DIR is the device tool's $OUT (which brings back at most
# 8 files), the tree is written to a scratch folder and OUT_DIR gets gpu_check.tar.gz,
# summary.json, summary.md and gpu_check.log, refreshed after every stage and every 30 s.
#
# Options:
#   --dry-run        CPU, Triton interpreter, tiny shapes: checks that the command works
#   --out DIR        output folder (default: $OUT, else ./gpu-check-<date>-<time>)
#   --pack/--no-pack see Output (--tree DIR: the scratch folder a packed run writes)
#   --stages LIST    run only these stages (comma list; env always runs)
#   --skip LIST      leave these stages out
#   --head HEAD      lm_head for the benchmarks: frozen (default) | trainable | both
#   --budget S       wall-clock seconds for the whole run (default 470 GPU, 300 dry run)
#   --setup/--no-setup  install the carried wheels and fastrl with tools/gpu_env.sh
#                    (default: on a GPU when .whl/ is there or fastrl is not importable)
# Environment: PY (python), COMPUTE_SANITIZER (its path), GPU_CHECK_TEST_WORKERS (4).
set -uo pipefail # no -e: a failed stage is recorded and the run goes on

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
START=$(date +%s)

usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

DRY=0 OUT_DIR="" PACK=auto TREE="" ONLY="" SKIP="" HEAD=frozen SETUP=auto BUDGET=""
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
        --out=*) OUT_DIR=${1#*=} ;;
        --pack) PACK=1 ;;
        --no-pack) PACK=0 ;;
        --tree) TREE=${2:?--tree needs a folder}; shift ;; # where the packed tree is written
        --stages) ONLY=${2:?}; shift ;;
        --skip) SKIP=${2:?}; shift ;;
        --head) HEAD=${2:?}; shift ;;
        --budget) BUDGET=${2:?}; shift ;;
        --setup) SETUP=1 ;;
        --no-setup) SETUP=0 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            [[ -z $OUT_DIR ]] || { echo "gpu_check: one output folder, got $OUT_DIR and $1" >&2; exit 2; }
            OUT_DIR=$1 ;;
    esac
    shift
done
case $HEAD in frozen | trainable | both) ;; *) echo "gpu_check: --head $HEAD?" >&2; exit 2 ;; esac

# The device tool's $OUT brings back at most 8 files: pack there unless told otherwise.
from_env=0
if [[ -z $OUT_DIR && -n ${OUT:-} ]]; then OUT_DIR=$OUT from_env=1; fi
[[ -n $OUT_DIR ]] || OUT_DIR=$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [[ $PACK == auto ]]; then
    PACK=0
    if ((from_env)) || { [[ -n ${OUT:-} && -d ${OUT:-} ]] && [[ $(cd "$OUT" && pwd) == "$OUT_DIR" ]]; }; then
        PACK=1
    fi
fi
if ((PACK)); then
    [[ -n $TREE ]] || TREE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    mkdir -p "$TREE" && TREE=$(cd "$TREE" && pwd)
else
    TREE=$OUT_DIR
fi
RES=$TREE/results LOGS=$TREE/logs
mkdir -p "$RES" "$LOGS"
LOG=$TREE/gpu_check.log

say() { printf '%s\n' "$*" | tee -a "$LOG"; }

if ((DRY)); then
    : "${BUDGET:=300}"
    # the CPU, whatever the machine has: the interpreter runs the kernels (DESIGN.md)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    : "${BUDGET:=470}"
    unset TRITON_INTERPRET # compiled kernels on the GPU, whatever the caller's shell has
fi
# a developer's venv, else the device image's python3 (which has torch and Triton)
if [[ -z ${PY:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
export PY PYTHONUNBUFFERED=1 MPLBACKEND=Agg
DEADLINE=$((START + BUDGET))
REPORT_RESERVE=30 # seconds kept for the report and the last pack
KILL_GRACE=10     # timeout -k: SIGKILL this long after SIGTERM

# the commit, read here: the copy the stages run from may have no git checkout
if [[ -z ${FASTRL_GIT_COMMIT:-} ]] && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    FASTRL_GIT_COMMIT=$(git -C "$REPO" rev-parse HEAD)
    if [[ -n $(GIT_OPTIONAL_LOCKS=0 git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        FASTRL_GIT_DIRTY=1
    else
        FASTRL_GIT_DIRTY=0
    fi
    export FASTRL_GIT_COMMIT FASTRL_GIT_DIRTY
fi

pack() {
    ((PACK)) || return 0
    local tmp=$TREE.$BASHPID.tar.gz
    tar -C "$TREE" -czf "$tmp" . 2>/dev/null
    mv -f "$tmp" "$OUT_DIR/gpu_check.tar.gz"
    local f
    for f in summary.json summary.md gpu_check.log; do
        [[ -f $TREE/$f ]] && cp -f "$TREE/$f" "$OUT_DIR/$f.tmp" && mv -f "$OUT_DIR/$f.tmp" "$OUT_DIR/$f"
    done
    return 0
}

mode=gpu
if ((DRY)); then mode="dry-run"; fi
SUMMARY=$TREE/summary.json
"$PY" "$REPO/tools/gpu_report.py" init "$SUMMARY" --mode "$mode" --budget "$BUDGET" \
    "tree=$TREE" "out=$OUT_DIR" "head=$HEAD" "pack=$PACK" "commit=${FASTRL_GIT_COMMIT:-}" || exit 2
say "gpu_check $mode: results in $TREE$( ((PACK)) && echo " (packed into $OUT_DIR)"), budget ${BUDGET}s"

record() { # name status seconds rc limit est log reason
    "$PY" "$REPO/tools/gpu_report.py" record "$SUMMARY" "$@" >>"$LOG" 2>&1
}

# ----------------------------------------------------------------------------- setup

needs_setup=0
if ((!DRY)); then
    case $SETUP in
        1) needs_setup=1 ;;
        auto) if [[ -d $REPO/.whl ]] || ! "$PY" -c "import fastrl" >/dev/null 2>&1; then needs_setup=1; fi ;;
    esac
fi
if ((needs_setup)); then
    t0=$(date +%s)
    cd "$REPO" || exit 2
    # shellcheck source=tools/gpu_env.sh
    if . tools/gpu_env.sh >"$LOGS/setup.log" 2>&1; then status=ok; else status=error; fi
    # gpu_env.sh cd's to /tmp/work with tests/, bench/ and pyproject.toml; the stages need tools/ too
    [[ $PWD == "$REPO" ]] || cp -r "$REPO/tools" . || status=error
    reason=""
    [[ $status == ok ]] || reason=$(grep -v '^\s*$' "$LOGS/setup.log" | tail -n 1 | cut -c1-300)
    record setup "$status" $(($(date +%s) - t0)) "" "" 20 logs/setup.log "$reason"
    say "[setup] $status $(($(date +%s) - t0))s (tools/gpu_env.sh: carried wheels, fastrl into /tmp/site)"
    [[ $status == ok ]] || tail -n 15 "$LOGS/setup.log" | tee -a "$LOG"
else
    cd "$REPO" || exit 2
fi
say "    stages run in $PWD with $PY"

# ----------------------------------------------------------------------------- stages
# name, timeout on a GPU, timeout in the dry run, expected seconds on an H200 (estimated
# from the work each does: the README's table). With the ~20 s setup they sum to ~420 s of
# the 470 s budget; a stage that overruns takes from the ones after it (each gets at most
# what is left), so the least needed go last: preference (its variants are linear_logprobs'
# designs, measured by logprobs) and memcheck (which moves up when the smoke fails).
STAGE_TABLE="
env          60   60    6
smoke        150  120   40
numerics     90   90    15
padding      90   60    12
logprobs     180  120   100
policy       140  120   75
gpu_tests    150  90    50
gae          100  60    40
preference   120  90    55
memcheck     120  90    40
grpo_step    540  150   420
ppo_step     280  120   200
report       60   60    5
"
OPTIONAL=",grpo_step,ppo_step," # stages run only when --stages names them
ORDER=()
declare -A TIMEOUT=() EST=()
while read -r name gpu_t dry_t est; do
    [[ -n $name ]] || continue
    ORDER+=("$name")
    if ((DRY)); then TIMEOUT[$name]=$dry_t; else TIMEOUT[$name]=$gpu_t; fi
    EST[$name]=$est
done <<<"$STAGE_TABLE"

wanted() { # env and report always run
    local s=$1
    [[ $s == env || $s == report ]] && return 0
    [[ $OPTIONAL == *",$s,"* && ",$ONLY," != *",$s,"* ]] && return 1
    [[ -n $ONLY && ",$ONLY," != *",$s,"* ]] && return 1
    [[ -n $SKIP && ",$SKIP," == *",$s,"* ]] && return 1
    return 0
}

STEM=unknown-$(date +%F)
SAN=""
find_sanitizer() {
    local c
    for c in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
        ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} /usr/local/cuda/bin/compute-sanitizer \
        /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
        if [[ -n $c && -x $c ]]; then SAN=$c; return 0; fi
    done
    return 1
}

stage_cmd() { # the stage's command line, into CMD
    local s=$1 tiny=()
    ((DRY)) && tiny=(--tiny)
    case $s in
        env) CMD=("$PY" tools/gpu_env_info.py --out "$TREE/env.json" --repo "$REPO") ;;
        smoke) # a process per dtype: most of a first GPU run is Triton compiling
            local jobs=3
            ((DRY)) && jobs=2
            CMD=("$PY" tools/gpu_smoke.py --out "$TREE/smoke.json" --jobs "$jobs" "${tiny[@]}") ;;
        numerics) CMD=("$PY" tools/gpu_numerics.py --out "$RES/numerics-$STEM.json" "${tiny[@]}") ;;
        padding) CMD=("$PY" tools/gpu_padding.py --out "$RES/padding-$STEM.json" "${tiny[@]}") ;;
        logprobs | policy | preference)
            local dry=()
            ((DRY)) && dry=(--dry-run)
            mapfile -t CMD < <("$PY" tools/gpu_plan.py args "$s" "${dry[@]}" --out-dir "$RES" --stem "$STEM")
            CMD=("$PY" "${CMD[@]}" --head "$HEAD") ;;
        gpu_tests)
            local workers=()
            # several workers: compilation is CPU-bound, and a test that breaks its CUDA
            # context takes only its worker down
            if ((!DRY)) && "$PY" -c "import xdist" >/dev/null 2>&1; then
                workers=(-n "${GPU_CHECK_TEST_WORKERS:-4}")
            fi
            CMD=("$PY" -m pytest -q -m gpu tests -p no:cacheprovider "${workers[@]}"
                --junitxml="$TREE/gpu_tests.xml" -o junit_family=xunit2) ;;
        memcheck) # one process (the sanitizer follows no children); fp16 runs bf16's code
            local mdtypes=(--dtypes "bf16,fp32")
            ((DRY)) && mdtypes=()
            # without the caching allocator every tensor is its own allocation, so an
            # out-of-bounds access inside a pooled block is seen too; ptxas and other
            # children of the smoke are not instrumented
            CMD=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 86
                --target-processes application-only --print-limit 200 --log-file "$TREE/memcheck.log"
                "$PY" tools/gpu_smoke.py --out "$TREE/smoke-memcheck.json" "${mdtypes[@]}" "${tiny[@]}") ;;
        grpo_step) # each (model, trainer) in its own worker process, under its own timeout
            local trainers=fastrl,trl,trl-patched shape
            if "$PY" -c "import vllm" >/dev/null 2>&1; then
                trainers+=,fastrl+vllm,trl+vllm,trl-patched+vllm
            fi
            if ((DRY)); then
                shape=(--models tiny --device cpu --steps 1 --warmup 0 --num-generations 4
                    --prompt-length 16 --completion-length 16 --timeout 120)
            else
                shape=(--models qwen2.5-1.5b,qwen2.5-7b --steps 1 --warmup 1 --timeout 250)
            fi
            CMD=("$PY" bench/bench_grpo_step.py --trainers "$trainers" "${shape[@]}"
                --vllm-python "$PY" --cache-dir "${TMPDIR:-/tmp}/fastrl-bench-cache" --out "$RES/grpo_step-$STEM.json") ;;
        ppo_step) # the verl row only where this python has verl (the device image has not)
            local trainers=fastrl shape
            "$PY" -c "import verl" >/dev/null 2>&1 && trainers+=,verl
            if ((DRY)); then
                shape=(--models tiny --device cpu --steps 1 --warmup 0 --rollout-size 4
                    --prompt-length 16 --completion-length 16 --timeout 100)
            else
                shape=(--models qwen2.5-1.5b --steps 1 --warmup 1 --timeout 250)
            fi
            CMD=("$PY" bench/bench_ppo_step.py --trainers "$trainers" "${shape[@]}" --verl-python "$PY"
                --cache-dir "${TMPDIR:-/tmp}/fastrl-bench-cache" --out "$RES/ppo_step-$STEM.json") ;;
        gae) CMD=("$PY" bench/bench_gae.py --out "$RES/gae-$STEM.json") ;;
        report) CMD=("$PY" tools/gpu_report.py report "$TREE") ;;
    esac
}

classify() { # stage rc -> STATUS (ok, fail: ran and a check failed, timeout, error, skipped)
    local s=$1 rc=$2 san=$TREE/memcheck.log
    case $rc in
        0) STATUS=ok ;;
        124 | 137) STATUS=timeout ;;
        3) STATUS=fail ;; # the helpers' "ran, a check failed, results written"
        *) STATUS=error ;;
    esac
    if [[ $s == gpu_tests ]]; then
        case $rc in 1) STATUS=fail ;; 5) STATUS=ok ;; esac # 5: no gpu test collected
    elif [[ $s == memcheck ]]; then
        # judged on the sanitizer's own summary: the smoke's exit status is the smoke stage's
        if ((rc == 86)) || grep -q "ERROR SUMMARY: [1-9]" "$san" 2>/dev/null; then
            STATUS=fail
        elif grep -q "ERROR SUMMARY: 0 errors" "$san" 2>/dev/null; then
            STATUS=ok
        elif [[ $STATUS != timeout ]] && grep -qi "not supported" "$san" 2>/dev/null; then
            STATUS=skipped # e.g. gVisor: "Device not supported" (KINDS.md)
        fi
    fi
}

run_stage() {
    local s=$1 now left limit t0 rc reason log=logs/$1.log
    now=$(date +%s)
    left=$((DEADLINE - now - KILL_GRACE))
    [[ $s == report ]] || left=$((left - REPORT_RESERVE))
    limit=${TIMEOUT[$s]}
    ((left < limit)) && limit=$left
    STATUS=skipped
    if [[ $s == memcheck ]] && ! find_sanitizer; then
        reason="compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin; set COMPUTE_SANITIZER)"
        record "$s" skipped 0 "" "" "${EST[$s]}" "" "$reason"
        say "[$s] skipped: $reason"
        pack
        return
    fi
    if ((limit < 10)); then
        record "$s" skipped 0 "" "" "${EST[$s]}" "" "no time left in the ${BUDGET}s budget"
        say "[$s] skipped: no time left in the ${BUDGET}s budget"
        pack
        return
    fi
    stage_cmd "$s"
    printf '$ %s\n' "${CMD[*]}" >"$TREE/$log"
    t0=$(date +%s)
    local packer=""
    if ((PACK)); then
        (while sleep 30; do pack; done) &
        packer=$!
    fi
    timeout -k "$KILL_GRACE" "$limit" "${CMD[@]}" >>"$TREE/$log" 2>&1 </dev/null
    rc=$?
    [[ -n $packer ]] && kill "$packer" 2>/dev/null && wait "$packer" 2>/dev/null
    local took=$(($(date +%s) - t0))
    classify "$s" "$rc"
    reason=""
    if [[ $STATUS != ok ]]; then
        if [[ $STATUS == timeout ]]; then
            reason="stopped after ${limit}s (timeout); what it wrote before is kept"
        elif [[ $s == memcheck && -f $TREE/memcheck.log ]]; then
            reason=$(grep -m1 -iE "error summary|not supported|error" "$TREE/memcheck.log" | cut -c1-300)
        fi
        if [[ -z $reason ]]; then
            reason=$(grep -v '^\s*$' "$TREE/$log" | tail -n 1 | cut -c1-300)
        fi
    fi
    record "$s" "$STATUS" "$took" "$rc" "$limit" "${EST[$s]}" "$log" "$reason"
    if [[ $s == report ]]; then # the headline, for whoever reads only the output's tail
        tail -n +2 "$TREE/$log" | tee -a "$LOG"
    else
        say "[$s] $STATUS ${took}s (limit ${limit}s, rc $rc)$([[ -n $reason ]] && echo ": $reason")"
        [[ $STATUS == ok || $STATUS == skipped ]] || grep -v '^\s*$' "$TREE/$log" | tail -n 12 | sed 's/^/    /' | tee -a "$LOG"
    fi
    if [[ $s == env && -f $TREE/env.json ]]; then
        STEM=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["stem"])' "$TREE/env.json" 2>/dev/null || echo "$STEM")
        say "    $(grep -v '^\$ ' "$TREE/$log" | tail -n 1)"
    fi
    pack
}

memcheck_done=0
for s in "${ORDER[@]}"; do
    wanted "$s" || continue
    if [[ $s == memcheck ]]; then ((memcheck_done)) && continue; fi
    run_stage "$s"
    if [[ $s == smoke && $STATUS != ok && $STATUS != skipped ]] && wanted memcheck; then
        say "    the smoke failed: memcheck now, to say where"
        run_stage memcheck
        memcheck_done=1
    fi
done
say "gpu_check $mode done in $(($(date +%s) - START))s: $TREE"
pack
exit 0
