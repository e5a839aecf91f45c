#!/usr/bin/env bash
# Cloud TPU VM or pod slice for plca_jax, from a workstation with gcloud.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND --name=NAME --zone=ZONE [options]
#
# Commands (in the order a run uses them):
#   create  --accelerator=TYPE [--version=RUNTIME] [--spot]
#             make the TPU VM / pod slice. TYPE: v4-8, v4-32, v5litepod-8
#             (v5e; v5e-8 is accepted), v5p-8, v5p-16, v6e-8, ... The
#             runtime (software version) follows the generation unless
#             --version is given: v4 tpu-ubuntu2204-base, v5e
#             v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
#   setup   copy this checkout to every worker (git HEAD plus uncommitted
#           changes to tracked files; untracked files are listed and not
#           copied) and make a Python >= 3.11 environment there with the
#           TPU build of jax and the project (launch/provision.sh: the
#           images ship Python 3.10)
#   data    --from=gs://BUCKET/PATH
#             copy the datasets onto every worker's disk (~/data)
#   train   --config=configs/X.py --workdir=gs://BUCKET/runs/RUN [-- FLAGS]
#             start the same training command on every worker, in the
#             background (FLAGS go to plca_jax.main, e.g. data roots; `--`
#             and FLAGS come last). Refused on a worker where a trainer still
#             runs; plca_jax.main also refuses a workdir locked by a live run
#             (WORKDIR/RUN_LOCK). Each process's log is copied to
#             WORKDIR/logs/process_<i>.log every minute and at exit.
#   logs    [--worker=N]  follow worker N's console (default 0)
#   stop    send SIGTERM to the trainers: they checkpoint and exit
#   delete  delete the TPU VM
#
# Every command prints the commands it runs; with --dry-run it only prints
# them. Options common to all: --name, --zone, [--project].
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

# Paths on the workers (expanded there).
ENV_PYTHON="\${HOME}/plca_jax_env/bin/python"
CONSOLE_LOG="\${HOME}/plca_jax_train.log"

dry_run=0
command=""
name=""
zone=""
project=""
accelerator=""
version=""
spot=0
data_from=""
config=""
workdir=""
worker=0
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
    --worker=*) worker="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    create|setup|data|train|logs|stop|delete)
      [[ -z "${command}" ]] || die "two commands: ${command} and $1"
      command="$1" ;;
    *) die "unknown argument: $1 (see the header of this script)" ;;
  esac
  shift
done

[[ -n "${command}" ]] || die "no command (create, setup, data, train, logs, stop, delete)"
[[ -n "${name}" ]] || die "--name=NAME is required"
[[ -n "${zone}" ]] || die "--zone=ZONE is required"

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=${zone}")
if [[ -n "${project}" ]]; then
  where+=("--project=${project}")
fi

# The runtime (TPU software version) of an accelerator type's generation.
runtime_for() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "unknown accelerator type $1: expected v4-N, v5litepod-N (v5e-N), v5p-N or v6e-N" ;;
  esac
}

case "${command}" in
  create)
    [[ -n "${accelerator}" ]] || die "create needs --accelerator=TYPE (e.g. v4-8)"
    accelerator="${accelerator/#v5e-/v5litepod-}"
    if [[ -z "${version}" ]]; then
      version="$(runtime_for "${accelerator}")"
    fi
    args=("${tpu[@]}" create "${name}" "${where[@]}"
          "--accelerator-type=${accelerator}" "--version=${version}")
    if [[ "${spot}" -eq 1 ]]; then
      args+=(--spot)
    fi
    run "${args[@]}"
    ;;
  setup)
    # HEAD plus the uncommitted changes to tracked files, as one commit
    # object that changes no branch (empty when there are none).
    snapshot="$(git -C "${REPO}" stash create)"
    if [[ -n "${snapshot}" ]]; then
      echo "setup: copying HEAD with the uncommitted changes to tracked files" >&2
    fi
    untracked="$(git -C "${REPO}" ls-files --others --exclude-standard)"
    if [[ -n "${untracked}" ]]; then
      echo "setup: untracked files are NOT copied (git add them first):" >&2
      while IFS= read -r file; do
        echo "  ${file}" >&2
      done <<< "${untracked}"
    fi
    run git -C "${REPO}" archive --format=tar.gz --prefix=plca_jax/ \
      -o /tmp/plca_jax.tar.gz "${snapshot:-HEAD}"
    run "${tpu[@]}" scp /tmp/plca_jax.tar.gz "${name}:plca_jax.tar.gz" \
      "${where[@]}" --worker=all
    run "${tpu[@]}" ssh "${name}" "${where[@]}" --worker=all \
      "--command=rm -rf plca_jax && tar xzf plca_jax.tar.gz && bash plca_jax/launch/provision.sh --jax=tpu"
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
      "--command=if pgrep -f plca_jax.main >/dev/null; then echo \"\$(hostname): a trainer is still running (launch/tpu_vm.sh stop)\" >&2; exit 1; fi; cd plca_jax && PLCA_JAX_DISTRIBUTED=1 nohup ${ENV_PYTHON} -m plca_jax.main --config=${config} --workdir=${workdir}${flags} > ${CONSOLE_LOG} 2>&1 < /dev/null &"
    ;;
  logs)
    [[ "${worker}" =~ ^[0-9]+$ ]] || die "--worker must be a worker number"
    run "${tpu[@]}" ssh "${name}" "${where[@]}" "--worker=${worker}" \
      "--command=tail -n 100 -f ${CONSOLE_LOG}"
    ;;
  stop)
    run "${tpu[@]}" ssh "${name}" "${where[@]}" --worker=all \
      "--command=pkill -TERM -f plca_jax.main || true"
    ;;
  delete)
    run "${tpu[@]}" delete "${name}" "${where[@]}" --quiet
    ;;
esac
