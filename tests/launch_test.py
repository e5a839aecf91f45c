"""Tests of launch/*.sh: shellcheck, dry runs, and the README's commands."""

import os
import re
import shlex
import shutil
import subprocess

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/tpu_vm.sh", "launch/gpu.sh", "launch/common.sh",
           "benchmarks/accelerator.sh")
REPO_PLACEHOLDER = "/path/to/plca_jax"


def _dry_run(*args):
  proc = subprocess.run([os.path.join(REPO, args[0]), "--dry-run", *args[1:]],
                        capture_output=True, text=True, timeout=60,
                        check=False)
  return proc.returncode, proc.stdout.replace(REPO, REPO_PLACEHOLDER), \
      proc.stderr


def _readme_section(title):
  text = open(os.path.join(REPO, "README.md")).read()
  start = text.index(f"## {title}")
  end = text.find("\n## ", start + 1)
  return text[start:end if end > 0 else None]


class LaunchTest(absltest.TestCase):

  def test_shellcheck(self):
    self.assertIsNotNone(shutil.which("shellcheck"),
                         "shellcheck is needed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO,
                          capture_output=True, text=True, check=False)
    self.assertEqual(proc.returncode, 0, proc.stdout)

  def test_tpu_dry_runs(self):
    base = ("--name=plca", "--zone=us-central2-b")
    code, out, _ = _dry_run("launch/tpu_vm.sh", "create", *base,
                            "--accelerator=v4-32", "--spot")
    self.assertEqual(code, 0)
    self.assertEqual(out.strip(), (
        "gcloud compute tpus tpu-vm create plca --zone=us-central2-b "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"))
    code, out, _ = _dry_run("launch/tpu_vm.sh", "setup", *base)
    lines = out.strip().splitlines()
    self.assertLen(lines, 3)
    self.assertIn("--worker=all", lines[1])
    self.assertIn('pip install "jax[tpu]==0.10.2"', lines[2])
    self.assertIn("pip install -r requirements.txt -e .", lines[2])
    code, out, _ = _dry_run("launch/tpu_vm.sh", "train", *base,
                            "--config=configs/gta5.py",
                            "--workdir=gs://b/runs/x", "--",
                            "--config.data.source.root=/d/GTA5")
    self.assertEqual(code, 0)
    words = shlex.split(out)
    command = next(w for w in words if w.startswith("--command="))
    self.assertIn("--worker=all", words)
    self.assertIn("PLCA_JAX_DISTRIBUTED=1", command)
    self.assertIn("python3 -m plca_jax.main --config=configs/gta5.py "
                  "--workdir=gs://b/runs/x --config.data.source.root=/d/GTA5",
                  command)
    code, out, _ = _dry_run("launch/tpu_vm.sh", "delete", *base)
    self.assertIn("tpu-vm delete plca --zone=us-central2-b --quiet", out)

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

  def test_gpu_dry_runs(self):
    code, out, _ = _dry_run("launch/gpu.sh", "setup")
    self.assertEqual(code, 0)
    self.assertIn("pip install 'jax[cuda12]==0.10.2'", out)
    code, out, _ = _dry_run("launch/gpu.sh", "train", "--config=c.py",
                            "--workdir=/w", "--", "--config.seed=1")
    self.assertEqual(out.strip(), "python3 -m plca_jax.main --config=c.py "
                     "--workdir=/w --config.seed=1")

  def test_readme_commands_match_the_dry_runs(self):
    for title in ("Running on Cloud TPU", "Running on GPUs"):
      section = _readme_section(title)
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
