#!/usr/bin/env bash
# Runs on the machine that trains (each TPU VM worker, the GPU box), from
# the root of the plca_jax code: a Python >= 3.11 environment with the
# pinned stack, whatever Python the image ships (the TPU VM images have 3.10).
#
#   launch/provision.sh [--dry-run] --jax=EXTRA [--env=DIR] [--python-only]
#
#   --jax=EXTRA     the jax build: tpu, cuda12 or cuda13 (jax[EXTRA])
#   --env=DIR       the environment (default ~/plca_jax_env)
#   --python-only   make the environment, install nothing into it
#
# uv provides the interpreter: it uses a Python 3.11+ it finds on the
# machine, else downloads a standalone CPython build. uv itself comes from
# PyPI (pip --user) when it is not on PATH or beside python3.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

PYTHON_VERSION="$(sed -n 's/^requires-python = ">=\([0-9.]*\)".*/\1/p' \
  "${REPO}/pyproject.toml")"
JAX_VERSION="$(sed -n 's/^jax==//p' "${REPO}/requirements.txt")"

dry_run=0
jax_extra=""
env_dir="${HOME}/plca_jax_env"
python_only=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --jax=*) jax_extra="${1#*=}" ;;
    --env=*) env_dir="${1#*=}" ;;
    --python-only) python_only=1 ;;
    *) die "unknown argument: $1 (see the header of this script)" ;;
  esac
  shift
done

[[ "${python_only}" -eq 1 || "${jax_extra}" =~ ^(tpu|cuda12|cuda13)$ ]] \
  || die "--jax must be tpu, cuda12 or cuda13"

# uv: on PATH, beside python3 (a virtual environment's), or pip --user's.
for dir in "$(dirname "$(command -v python3)")" "${HOME}/.local/bin"; do
  if ! command -v uv >/dev/null && [[ -x "${dir}/uv" ]]; then
    PATH="${dir}:${PATH}"
  fi
done
if ! command -v uv >/dev/null; then
  run python3 -m pip install --user --quiet uv
  PATH="${HOME}/.local/bin:${PATH}"
fi
run uv venv --python "${PYTHON_VERSION}" "${env_dir}"
if [[ "${python_only}" -eq 0 ]]; then
  run uv pip install --python "${env_dir}/bin/python" \
    "jax[${jax_extra}]==${JAX_VERSION}" -r "${REPO}/requirements.txt" \
    -e "${REPO}"
fi
echo "plca_jax environment: ${env_dir}/bin/python"
