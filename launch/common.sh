#!/usr/bin/env bash
# Shared by the launch scripts (sourced): printing and running commands.

# Prints a command with quoting a reader can paste, then runs it unless
# dry_run=1 (set by the sourcing script).
run() {
  local out="" arg
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then
      out+="${arg} "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
  if [[ "${dry_run:-0}" -eq 0 ]]; then
    "$@"
  fi
}

# Prints "SCRIPT: message" to stderr and exits 2.
die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}
