#!/usr/bin/env bash
# plca_jax on one machine with one or more NVIDIA GPUs.
#
#   launch/gpu.sh [--dry-run] setup [--cuda=12|13]
#       install the CUDA build of jax (same version as requirements.txt),
#       then the project
#   launch/gpu.sh [--dry-run] train --config=configs/X.py --workdir=DIR [-- FLAGS]
#       train on all visible GPUs: one process drives every local GPU (the
#       batch is sharded over a mesh of all devices); restrict the GPUs with
#       CUDA_VISIBLE_DEVICES. FLAGS go to plca_jax.main; `--` comes last.
#
# Every command prints the commands it runs; with --dry-run it only prints
# them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==//p' "${REPO}/requirements.txt")"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

dry_run=0
command=""
cuda=12
config=""
workdir=""
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --cuda=*) cuda="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
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
    run python3 -m pip install "jax[cuda${cuda}]==${JAX_VERSION}"
    run python3 -m pip install -r "${REPO}/requirements.txt" -e "${REPO}"
    ;;
  train)
    [[ -n "${config}" ]] || die "train needs --config=configs/X.py"
    [[ -n "${workdir}" ]] || die "train needs --workdir=DIR"
    run python3 -m plca_jax.main "--config=${config}" "--workdir=${workdir}" \
      "${extra[@]+"${extra[@]}"}"
    ;;
  *) die "no command (setup, train)" ;;
esac
