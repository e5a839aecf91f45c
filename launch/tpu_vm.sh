#!/usr/bin/env bash
# Cloud TPU VM or pod slice for plca_jax, from a workstation with gcloud.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND --name=NAME --zone=ZONE [options]
#
# Commands (in the order a run uses them):
#   create  --accelerator=TYPE [--version=RUNTIME] [--spot]
#             make the TPU VM / pod slice (TYPE e.g. v4-8, v4-32, v5p-16)
#   setup   copy this checkout (git HEAD) to every worker and install the TPU
#           build of jax plus the project there
#   data    --from=gs://BUCKET/PATH
#             copy the datasets onto every worker's disk (~/data)
#   train   --config=configs/X.py --workdir=gs://BUCKET/runs/RUN [-- FLAGS]
#             start the same training command on every worker (in the
#             background; FLAGS go to plca_jax.main, e.g. data roots;
#             `--` and FLAGS come last)
#   logs    follow worker 0's training log
#   delete  delete the TPU VM
#
# Every command prints the commands it runs; with --dry-run it only prints
# them. Options common to all: --name, --zone, [--project].
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==//p' "${REPO}/requirements.txt")"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

dry_run=0
command=""
name=""
zone=""
project=""
accelerator=""
version="tpu-ubuntu2204-base"
spot=0
data_from=""
config=""
workdir=""
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) spot=1 ;;
    --from=*) data_from="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    create|setup|data|train|logs|delete)
      [[ -z "${command}" ]] || die "two commands: ${command} and $1"
      command="$1" ;;
    *) die "unknown argument: $1 (see the header of this script)" ;;
  esac
  shift
done

[[ -n "${command}" ]] || die "no command (create, setup, data, train, logs, delete)"
[[ -n "${name}" ]] || die "--name=NAME is required"
[[ -n "${zone}" ]] || die "--zone=ZONE is required"

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=${zone}")
if [[ -n "${project}" ]]; then
  where+=("--project=${project}")
fi

case "${command}" in
  create)
    [[ -n "${accelerator}" ]] || die "create needs --accelerator=TYPE (e.g. v4-8)"
    args=("${tpu[@]}" create "${name}" "${where[@]}"
          "--accelerator-type=${accelerator}" "--version=${version}")
    if [[ "${spot}" -eq 1 ]]; then
      args+=(--spot)
    fi
    run "${args[@]}"
    ;;
  setup)
    run git -C "${REPO}" archive --format=tar.gz --prefix=plca_jax/ \
      -o /tmp/plca_jax.tar.gz HEAD
    run "${tpu[@]}" scp /tmp/plca_jax.tar.gz "${name}:plca_jax.tar.gz" \
      "${where[@]}" --worker=all
    run "${tpu[@]}" ssh "${name}" "${where[@]}" --worker=all \
      "--command=rm -rf plca_jax && tar xzf plca_jax.tar.gz && cd plca_jax && pip install \"jax[tpu]==${JAX_VERSION}\" && pip install -r requirements.txt -e ."
    ;;
  data)
    [[ "${data_from}" == gs://* ]] || die "data needs --from=gs://BUCKET/PATH"
    run "${tpu[@]}" ssh "${name}" "${where[@]}" --worker=all \
      "--command=mkdir -p ~/data && gcloud storage cp -r \"${data_from%/}/*\" ~/data/"
    ;;
  train)
    [[ -n "${config}" ]] || die "train needs --config=configs/X.py"
    [[ "${workdir}" == gs://* ]] || die "train needs --workdir=gs://... (every worker must see the checkpoints)"
    flags=""
    for arg in "${extra[@]+"${extra[@]}"}"; do
      flags+=" ${arg}"
    done
    run "${tpu[@]}" ssh "${name}" "${where[@]}" --worker=all \
      "--command=cd plca_jax && PLCA_JAX_DISTRIBUTED=1 nohup python3 -m plca_jax.main --config=${config} --workdir=${workdir}${flags} > ~/train.log 2>&1 < /dev/null &"
    ;;
  logs)
    run "${tpu[@]}" ssh "${name}" "${where[@]}" --worker=0 \
      "--command=tail -n 100 -f ~/train.log"
    ;;
  delete)
    run "${tpu[@]}" delete "${name}" "${where[@]}" --quiet
    ;;
esac
