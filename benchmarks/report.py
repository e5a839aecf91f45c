"""`--markdown` for every benchmark: its tables as Markdown, with provenance.

A table printed with `--markdown` is preceded by one line naming the
command that produced it, the commit (with "+changes" when the working tree
differs from it) and the machine, so that a table pasted into docs/ says
where it came from.
"""

import os
import platform
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_flag(parser):
  parser.add_argument("--markdown", action="store_true",
                      help="also print the results as a Markdown table, "
                      "after a line with the command, commit and machine")


def commit():
  """The short commit of the checkout, "+changes" if it is modified."""
  def git(*args):
    proc = subprocess.run(["git", "-C", REPO, *args], capture_output=True,
                          text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""
  head = git("rev-parse", "--short", "HEAD") or "unknown"
  dirty = git("status", "--porcelain", "--untracked-files=no")
  return head + ("+changes" if dirty else "")


def machine():
  """CPU model and core count, and the accelerator when JAX has one."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  text = f"{os.cpu_count()}-core CPU ({model})"
  jax = sys.modules.get("jax")
  if jax is not None and jax.default_backend() != "cpu":
    devices = jax.devices()
    text += f", {len(devices)} x {devices[0].device_kind}"
  return text


def provenance(argv=None):
  argv = sys.argv if argv is None else argv
  script = os.path.relpath(os.path.abspath(argv[0]), REPO)
  command = " ".join(["python", script, *map(shlex.quote, argv[1:])])
  return f"`{command}`, commit {commit()}, {machine()}:"


def table(headers, rows):
  """Markdown table text of `rows` (sequences of cells)."""
  lines = ["| " + " | ".join(headers) + " |",
           "|" + " --- |" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def emit(args, headers, rows, title=None):
  """Prints the Markdown table when --markdown was given."""
  if not getattr(args, "markdown", False):
    return
  print()
  if title:
    print(title)
  print(provenance())
  print()
  print(table(headers, rows), flush=True)
