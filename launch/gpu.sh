#!/usr/bin/env bash
# plca_jax on one machine with one or more NVIDIA GPUs.
#
#   launch/gpu.sh [--dry-run] setup [--cuda=12|13] [--env=DIR]
#       a Python >= 3.11 environment (default ~/plca_jax_env) with the CUDA
#       build of jax (same version as requirements.txt) and the project
#       (launch/provision.sh)
#   launch/gpu.sh [--dry-run] train --config=configs/X.py --workdir=DIR
#                 [--autotune=LEVEL] [--env=DIR] [-- FLAGS]
#       train on all visible GPUs: one process drives every local GPU (the
#       batch is sharded over a mesh of all devices); restrict the GPUs with
#       CUDA_VISIBLE_DEVICES. FLAGS go to plca_jax.main; `--` comes last.
#       --autotune sets XLA's GPU autotuning level
#       (XLA_FLAGS=--xla_gpu_autotune_level=LEVEL): 0 skips timing kernel
#       candidates, which otherwise takes minutes for the R101 update's
#       first compile, at the price of untuned kernels (docs/cloud.md,
#       "Running on GPUs"). Default: XLA's.
#
# Every command prints the commands it runs; with --dry-run it only prints
# them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

dry_run=0
command=""
cuda=12
config=""
workdir=""
autotune=""
env_dir="${HOME}/plca_jax_env"
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --cuda=*) cuda="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --autotune=*) autotune="${1#*=}" ;;
    --env=*) env_dir="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    setup|train)
      [[ -z "${command}" ]] || die "two commands: ${command} and $1"
      command="$1" ;;
    *) die "unknown argument: $1 (see the header of this script)" ;;
  esac
  shift
done

case "${command}" in
  setup)
    [[ "${cuda}" =~ ^(12|13)$ ]] || die "--cuda must be 12 or 13"
    args=("--jax=cuda${cuda}" "--env=${env_dir}")
    if [[ "${dry_run}" -eq 1 ]]; then
      args+=(--dry-run)
    fi
    # It prints (and unless --dry-run runs) its own commands.
    bash "${REPO}/launch/provision.sh" "${args[@]}"
    ;;
  train)
    [[ -n "${config}" ]] || die "train needs --config=configs/X.py"
    [[ -n "${workdir}" ]] || die "train needs --workdir=DIR"
    command=("${env_dir}/bin/python" -m plca_jax.main "--config=${config}"
             "--workdir=${workdir}" "${extra[@]+"${extra[@]}"}")
    if [[ -n "${autotune}" ]]; then
      [[ "${autotune}" =~ ^[0-4]$ ]] || die "--autotune must be 0 to 4"
      command=(env "XLA_FLAGS=${XLA_FLAGS:+${XLA_FLAGS} }--xla_gpu_autotune_level=${autotune}"
               "${command[@]}")
    fi
    run "${command[@]}"
    ;;
  *) die "no command (setup, train)" ;;
esac
