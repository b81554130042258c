#!/usr/bin/env bash
# relbert-ds: set up everything (idempotent) and run the main job or the tests.
#
#   ./run.sh train [train.py options]   set up, train on the embedded defaults, evaluate, print results
#   ./run.sh test  [pytest options]     set up (plus the tests' Debian packages), run the test suite
#   ./run.sh setup                      set up only
#
# Set-up: a virtual environment in .venv (RELBERT_DS_VENV to move it), torch, then this package
# with its dependencies. `test` also installs the Debian packages only the tests use (SLURM +
# munge, Open MPI; when run as root with apt); `setup` and `train` do not need them. A second
# run reuses all of it (a stamp file records what was installed).
# torch: TORCH_VERSION (default 2.13.0) and TORCH_INDEX_URL choose the build, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./run.sh setup
# An existing torch in the venv is kept.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${RELBERT_DS_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
APT_PACKAGES="slurmctld slurmd slurm-client munge openmpi-bin"

log() { printf '[run.sh] %s\n' "$*" >&2; }

install_apt() {
    # Only the tests need these (a local SLURM cluster, Open MPI). Skip quietly where apt or root is missing.
    local missing=()
    for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "not root or no apt-get: skipping Debian packages ${missing[*]} (the SLURM tests will be skipped)"
        return 0
    fi
    log "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.relbert-ds-stamp"
    local want
    want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import relbert_ds, deepspeed" 2>/dev/null; then
        return 0
    fi
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        log "installing torch==$TORCH_VERSION"
        "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
    log "installing relbert-ds and its dependencies"
    "$VENV/bin/pip" install -q -e ".[dev]"
    echo "$want" > "$stamp"
}

setup() {
    install_python
    export PATH="$VENV/bin:$PATH"
    # One BLAS thread per rank: the local ranks share this machine's cores.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
}

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup ;;
    train)
        setup
        NPROC=${NPROC:-2}
        OUT=${RELBERT_DS_OUTPUT:-runs/default}
        log "training with $NPROC local ranks into $OUT"
        deepspeed --num_gpus "$NPROC" --master_port "$(free_port)" launchers/train.py \
            --deepspeed_config ds_configs/zero2.json --output_dir "$OUT" --overwrite "$@"
        # The whole bundled table: analogy sets and the BLESS / K&H+N probes (torch, fast protocol), for
        # the chosen model and the untrained backbone; vectors cached so a re-run does not encode again.
        log "evaluating $OUT/best_model (chosen on validation) and the untrained backbone"
        deepspeed --num_gpus "$NPROC" --master_port "$(free_port)" launchers/evaluate.py \
            --model "$OUT/best_model" --baseline all-MiniLM-L6-v2 --split valid test \
            --analogy semeval2012 sat u2 u4 google bats \
            --cache_dir "${RELBERT_DS_CACHE:-runs/vector_cache}" --output "$OUT/results.json" ;;
    test)
        install_apt
        setup
        # The style first (ruff.toml), then the tests; pytest's arguments pass through.
        python -m ruff check .
        python -m pytest "$@" ;;
    *)
        echo "usage: ./run.sh {train|test|setup} [options]" >&2; exit 2 ;;
esac
