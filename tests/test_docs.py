"""The docs cannot drift: docs/configs.md is generated from cf3d_jax/config_base.py (by
cf3d_jax/config_reference.py), and every relative link in README.md and docs/*.md reaches an
existing file (and heading)."""

from __future__ import annotations

import glob
import os
import re

import pytest

from cf3d_jax import config_base, config_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_MD = os.path.join(ROOT, "docs", "configs.md")
REGENERATE = "python -m cf3d_jax.config_reference --write docs/configs.md"
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_LINK = re.compile(  # [text](target "title"), ![alt](target); text may hold [brackets]
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(path: str) -> list[str]:
  """The file's lines outside fenced code blocks, inline code spans blanked."""
  lines, fenced = [], False
  with open(path, encoding="utf-8") as f:
    for line in f:
      if _FENCE.match(line):
        fenced = not fenced
        continue
      if not fenced:
        lines.append(re.sub(r"`[^`]*`", "``", line.rstrip("\n")))
  return lines


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: its rendered text lower-cased, punctuation dropped,
  spaces → '-'."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links → their text
  text = re.sub(r"[`*]", "", text)
  text = re.sub(r"<[^>]+>", "", text)
  return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
  """Anchors of the Markdown headings in `path` (duplicates get -1, -2, … as on GitHub)."""
  seen: dict[str, int] = {}
  out = set()
  fenced = False
  with open(path, encoding="utf-8") as f:
    for line in f:
      if _FENCE.match(line):
        fenced = not fenced
        continue
      m = None if fenced else _HEADING.match(line)
      if m:
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def _links(path: str) -> list[str]:
  links = []
  for line in _prose_lines(path):
    links += _INLINE_LINK.findall(line)
    m = _REF_LINK.match(line)
    if m:
      links.append(m.group(1))
  return links


def test_configs_reference_is_current():
  expected = config_reference.reference_markdown()
  with open(CONFIGS_MD, encoding="utf-8") as f:
    actual = f.read()
  assert actual == expected, f"docs/configs.md is stale: regenerate with `{REGENERATE}`"


def test_configs_reference_names_every_key():
  with open(CONFIGS_MD, encoding="utf-8") as f:
    text = f.read()
  missing = [".".join(k) for k in config_reference.leaf_paths(config_base.base_config())
             if f"`{'.'.join(k)}`" not in text]
  assert not missing, f"docs/configs.md lacks {missing}: regenerate with `{REGENERATE}`"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(doc):
  broken = []
  for link in _links(doc):
    if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I):   # http:, https:, mailto:, …
      continue
    target, _, anchor = link.partition("#")
    path = os.path.normpath(os.path.join(os.path.dirname(doc), target)) if target else doc
    if not os.path.exists(path):
      broken.append(f"{link} (no file {os.path.relpath(path, ROOT)})")
    elif anchor and path.endswith(".md") and anchor.lower() not in _anchors(path):
      broken.append(f"{link} (no heading #{anchor} in {os.path.relpath(path, ROOT)})")
  assert not broken, f"{os.path.relpath(doc, ROOT)}: broken links: {broken}"
