"""README.md and docs/: short README, links that resolve, and no reference
to a file or section that does not ship with the repository."""

import glob
import os
import re
import subprocess
import sys

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs",
                                                          "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# What a reader of the repository alone cannot see: working notes of past
# sessions and the team's specification files.
UNSHIPPED = re.compile(r"session [0-9]|SPEC\.md|\.\./shared", re.IGNORECASE)
DOC_REFERENCE = re.compile(
    r"docs/(\w+)\.md(?:, \"([^\"]+)\"|, '([^']+)'|, ([A-Z]\w*(?: and "
    r"[A-Z]\w*)*))?")
README_REFERENCE = re.compile(r"README,? \(?[\"']([^\"']+)[\"']")


def _read(path):
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return f.read()


def _headings(path):
  """The headings of a Markdown file, outside code blocks."""
  headings, fenced = [], False
  for line in _read(path).splitlines():
    if line.startswith("```"):
      fenced = not fenced
    elif not fenced and re.match(r"#{1,6} ", line):
      headings.append(line.lstrip("#").strip())
  return headings


def _slug(heading):
  """GitHub's anchor of a heading."""
  text = re.sub(r"[^\w\- ]", "", heading.lower())
  return text.replace(" ", "-")


def _tracked_files():
  proc = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True,
                        text=True, check=False)
  if proc.returncode == 0 and proc.stdout.strip():
    return proc.stdout.split()
  return [os.path.relpath(os.path.join(d, f), REPO)
          for d, _, files in os.walk(REPO) if "/." not in d for f in files]


class DocsTest(absltest.TestCase):

  def test_readme_is_short(self):
    self.assertLessEqual(len(_read("README.md").splitlines()), 250)

  def test_every_link_resolves(self):
    for doc in DOCS:
      for target in LINK.findall(_read(doc)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
          continue
        with self.subTest(doc=doc, link=target):
          path, _, anchor = target.partition("#")
          resolved = (os.path.normpath(os.path.join(os.path.dirname(doc),
                                                    path)) if path else doc)
          self.assertTrue(os.path.exists(os.path.join(REPO, resolved)),
                          f"{doc}: {target} does not exist")
          if anchor:
            self.assertIn(anchor, [_slug(h) for h in _headings(resolved)],
                          f"{doc}: no heading #{anchor} in {resolved}")

  def test_nothing_refers_to_files_that_do_not_ship(self):
    found = []
    for path in _tracked_files():
      try:
        text = _read(path)
      except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        continue
      for number, line in enumerate(text.splitlines(), 1):
        if UNSHIPPED.search(line):
          found.append(f"{path}:{number}: {line.strip()}")
    self.assertEqual(found, [])

  def test_referenced_docs_sections_exist(self):
    readme = _headings("README.md")
    missing = []
    for path in _tracked_files():
      if not path.endswith((".py", ".sh", ".md", ".txt", ".toml")):
        continue
      text = " ".join(_read(path).split())  # references across line breaks
      for match in DOC_REFERENCE.finditer(text):
        doc = f"docs/{match.group(1)}.md"
        if not os.path.exists(os.path.join(REPO, doc)):
          missing.append(f"{path}: {doc}")
          continue
        sections = match.group(2) or match.group(3) or match.group(4)
        headings = _headings(doc)
        for section in (sections.split(" and ") if sections else []):
          if not any(h.startswith(section) for h in headings):
            missing.append(f"{path}: {doc}, {section}")
      for match in README_REFERENCE.finditer(text):
        if match.group(1) not in readme:
          missing.append(f"{path}: README \"{match.group(1)}\"")
    self.assertEqual(missing, [])


class BenchmarkMarkdownTest(absltest.TestCase):

  def test_every_benchmark_can_print_markdown(self):
    scripts = glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
    with_parser = [p for p in scripts
                   if "argparse.ArgumentParser" in open(p).read()]
    self.assertGreaterEqual(len(with_parser), 9)
    for path in with_parser:
      self.assertIn("report.add_flag(parser)", open(path).read(), path)

  def test_markdown_names_command_commit_and_machine(self):
    proc = subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--config=configs/test.py",
         "--crop=33", "--dtypes=float32", "--remats=none", "--no_compile",
         "--markdown"], cwd=REPO, capture_output=True, text=True,
        timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertRegex(proc.stdout, r"`python benchmarks/memory\.py --config="
                     r"configs/test\.py .*--markdown`, commit [0-9a-f]+"
                     r"(\+changes)?, \d+-core CPU")
    self.assertIn("| compute dtype | remat | images / domain | saved for "
                  "backward GiB | XLA temporaries GiB |", proc.stdout)
    self.assertRegex(proc.stdout, r"\| float32 \| none \| 1 \| [\d.]+ \| - \|")


if __name__ == "__main__":
  absltest.main()
