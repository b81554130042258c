#!/bin/bash
# relbert-ds training launched by MPI: mpirun starts the ranks, mpi4py tells each its rank, and
# rank 0's host and a free port are agreed over MPI itself (relbert_ds/parallel/distributed.py).
#
#   RELBERT_DS_NP=8 launchers/mpi/train_mpi.sh --output_dir runs/mpi [train.py options]
#   RELBERT_DS_NP=16 RELBERT_DS_PPN=8 RELBERT_DS_HOSTFILE=hosts launchers/mpi/train_mpi.sh ...   # 2 nodes
#
# Environment:
#   RELBERT_DS_NP        total ranks (default 1)
#   RELBERT_DS_PPN       ranks per node (default: all on the first host / the hostfile's slots)
#   RELBERT_DS_HOSTFILE  "host slots=G" lines (the DeepSpeed/Open MPI format; converted to
#                        MPICH's "host:G" when mpirun is MPICH's Hydra)
#   RELBERT_DS_MPIRUN    the mpirun to use (default: mpirun on the PATH)
#   RELBERT_DS_PYTHON    the interpreter (default: python); it needs mpi4py built for that MPI
#   RELBERT_DS_MPI_ARGS  extra mpirun options (e.g. "--mca btl_tcp_if_include eth0")
#   MASTER_ADDR/MASTER_PORT  override the master agreed over MPI (e.g. a specific interface)
# Open MPI gets -x for each of these that is set (MPICH forwards everything): PATH, PYTHONPATH,
# LD_LIBRARY_PATH, VIRTUAL_ENV, MASTER_ADDR/PORT, and every NCCL_*, CUDA_*, TORCH_*, PYTORCH_*,
# GLOO_*, OMP_*, MKL_*, HF_*, TRANSFORMERS_*, DS_*, RELBERT_DS_*, UCX_*, FI_* and MPI4PY_* variable
# (CUDA_VISIBLE_DEVICES not inside a SLURM job, where each node has its own).
#
# Flavours:
#   Open MPI  (Debian openmpi-bin; `mpirun --version` says "Open MPI"): the script adds
#             --allow-run-as-root when run as root (Open MPI refuses root otherwise), --bind-to none
#             (ranks bind their own threads) and -x for the variables the ranks need (Open MPI does
#             not forward the environment to remote nodes unless told).
#   MPICH     (Debian mpich, or `pip install mpich` which puts mpirun into the venv; Hydra):
#             -genvall forwards the whole environment; -f takes the hostfile; -ppn the ranks per node.
# mpi4py must load the MPI whose mpirun starts it. pip's mpi4py (4.x) carries builds for both
# flavours: with Open MPI the script points it at Open MPI's libmpi (MPI4PY_MPIABI=openmpi,
# MPI4PY_LIBMPI=Open MPI's libmpi.so.40) unless you set those yourself.
#
# The ranks run `python -m mpi4py launchers/train.py`: with -m mpi4py an uncaught exception on one
# rank aborts the whole MPI job instead of leaving the others waiting.
set -euo pipefail
cd "$(dirname "$0")/../.."

NP=${RELBERT_DS_NP:-1}
PYTHON=${RELBERT_DS_PYTHON:-python}
MPIRUN=${RELBERT_DS_MPIRUN:-mpirun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

if ! version=$("$MPIRUN" --version 2>&1); then
    echo "error: '$MPIRUN' does not run; fix: install an MPI (pip install mpich mpi4py, or apt-get install" \
         "openmpi-bin / mpich) or set RELBERT_DS_MPIRUN" >&2
    exit 2
fi

# The exported variables the ranks need, one per line: Open MPI does not pass the environment to
# other nodes, and a rank there would miss e.g. NCCL_SOCKET_IFNAME or PYTHONPATH.
forwarded_variables() {
    local var
    for var in PATH PYTHONPATH LD_LIBRARY_PATH VIRTUAL_ENV TOKENIZERS_PARALLELISM PYTHONUNBUFFERED MASTER_ADDR \
               MASTER_PORT; do
        [ -n "${!var+set}" ] && echo "$var"
    done
    while read -r var; do
        case $var in
            # SLURM gives each node its own GPUs: the first node's list would replace theirs
            CUDA_VISIBLE_DEVICES) [ -z "${SLURM_JOB_ID:-}" ] && echo "$var" ;;
            NCCL_*|CUDA_*|TORCH_*|PYTORCH_*|GLOO_*|OMP_*|MKL_*|HF_*|TRANSFORMERS_*|DS_*|RELBERT_DS_*|UCX_*|FI_*|\
            MPI4PY_*) echo "$var" ;;
        esac
    done < <(compgen -e | sort)
    return 0
}

args=(-np "$NP")
if grep -qi "open mpi\|openrte\|open-rte" <<<"$version"; then
    flavour="Open MPI"
    [ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
    args+=(--bind-to none)
    [ -n "${RELBERT_DS_PPN:-}" ] && args+=(--map-by "ppr:${RELBERT_DS_PPN}:node")
    [ -n "${RELBERT_DS_HOSTFILE:-}" ] && args+=(--hostfile "$RELBERT_DS_HOSTFILE")
    # mpi4py's wheels carry an MPICH and an Open MPI build; without these it may load the MPICH that
    # `pip install mpich` put into the venv and fail with "unsupported PMI version PMIx".
    if [ -z "${MPI4PY_MPIABI:-}" ] && [ -z "${MPI4PY_LIBMPI:-}" ]; then
        ompi_info=$(dirname "$(command -v "$MPIRUN")")/ompi_info
        libdir=$("$ompi_info" --path libdir --parsable 2>/dev/null | sed -n 's/^path:libdir://p' || true)
        lib=$(ls "$libdir"/libmpi.so.* 2>/dev/null | head -n 1 || true)
        # Debian keeps libmpi.so.40 (Open MPI's soname) in the multiarch folder, not in libdir
        [ -z "$lib" ] && lib=$(ldconfig -p 2>/dev/null | awk '/libmpi\.so\.40 /{print $NF; exit}' || true)
        if [ -n "$lib" ]; then
            export MPI4PY_MPIABI=openmpi MPI4PY_LIBMPI="$lib"
        fi
    fi
    for var in $(forwarded_variables); do
        args+=(-x "$var")
    done
else
    flavour="MPICH (Hydra)"
    args+=(-genvall)
    [ -n "${RELBERT_DS_PPN:-}" ] && args+=(-ppn "$RELBERT_DS_PPN")
    if [ -n "${RELBERT_DS_HOSTFILE:-}" ]; then
        # "host slots=G" -> "host:G"
        mpich_hosts=$(mktemp "${TMPDIR:-/tmp}/relbert-ds-mpich-hosts.XXXXXX")
        trap 'rm -f "$mpich_hosts"' EXIT
        sed -E 's/^([^[:space:]#]+)[[:space:]]+slots=([0-9]+).*/\1:\2/' "$RELBERT_DS_HOSTFILE" > "$mpich_hosts"
        args+=(-f "$mpich_hosts")
    fi
fi
# shellcheck disable=SC2206
[ -n "${RELBERT_DS_MPI_ARGS:-}" ] && args+=(${RELBERT_DS_MPI_ARGS})

echo "[train_mpi.sh] $flavour: $MPIRUN ${args[*]} $PYTHON -m mpi4py launchers/train.py $*" >&2
"$MPIRUN" "${args[@]}" "$PYTHON" -m mpi4py launchers/train.py "$@"
