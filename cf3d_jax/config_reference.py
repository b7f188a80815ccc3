"""The configs reference, docs/configs.md, from cf3d_jax/config_base.py, config_ranges.py and
configs/*.py.

`python -m cf3d_jax.config_reference --write docs/configs.md` regenerates it; tests/test_docs.py
checks it is current. Each key's meaning is the trailing comment on its line in `base_config`
(or, until one is written, its entry in `_MEANINGS_WITHOUT_COMMENT`); its allowed range is
`config_ranges.RANGES`.
"""

from __future__ import annotations

import ast
import inspect
import io
import os
import re
import textwrap
import tokenize
from typing import Iterator

import ml_collections

from cf3d_jax import config_base, config_ranges
from cf3d_jax.errors import ConfigError

# Meanings of keys whose line in `base_config` has no comment yet. Prefer a trailing comment on
# the key's line: `reference_markdown` then raises until the entry here is deleted, so each key
# has exactly one meaning, and a key with neither is an error.
_MEANINGS_WITHOUT_COMMENT = {
    "model.name": "the denoiser: 'unet' (the only one; recorded, not read by the code)",
    "model.base_channels": "channels of the first U-Net level (× channel_mult per level)",
    "model.num_res_blocks": "residual blocks per level in the encoder (decoder: this + 1)",
    "model.middle_attention": "self-attention in the middle (bottleneck) blocks",
    "model.head_channels": "channels per attention head (self- and cross-attention)",
    "model.middle_cross_attention": "text cross-attention in the middle blocks",
    "model.middle_dropout": "dropout (model.dropout) in the middle blocks",
    "model.num_groups": "GroupNorm groups (must divide every width)",
    "model.resblock_updown": "down/up-sample inside a residual block (wdm-3d); False = a "
                             "stride-2 conv down, an upsampling conv layer up",
    "objective.beta_start": "DDPM: first beta of the schedule",
    "objective.beta_end": "DDPM: last beta of the schedule",
    "objective.shift_scale": "rflow: multiplies the resolution-shift ratio r",
    "train.num_steps": "optimisation steps (the run stops here; resumes continue to it)",
    "train.learning_rate": "AdamW learning rate after warmup (held, or the start of the cosine decay: train.lr_schedule)",
    "train.warmup_steps": "linear warmup from 0 to learning_rate over this many steps",
    "train.weight_decay": "AdamW decoupled weight decay",
    "train.ema_decay": "EMA of the params: ema ← d·ema + (1 − d)·params each step",
    "train.log_every": "steps between logged train metrics",
    "train.checkpoint_every": "steps between orbax checkpoints",
    "train.max_to_keep": "checkpoints kept",
    "sample.use_ema": "sample with the EMA params (False = the raw params)",
    "classifier.num_steps": "optimisation steps",
    "classifier.batch_size": "volumes per step",
    "classifier.learning_rate": "AdamW learning rate",
    "classifier.weight_decay": "AdamW weight decay",
    "classifier.dropout": "channel dropout (Dropout3d) rate in each dense layer",
}


def _comment_lines(source: str) -> tuple[dict[int, tuple[int, str]], set[int]]:
  """({line: (column, text)} of every comment, the lines holding only a comment)."""
  comments, code_lines = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  return comments, set(comments) - code_lines


def _assigned_keys() -> list[tuple[str, bool, str]]:
  """(dotted key, is a section, meaning or '') for each `c.<key> = …` of `base_config`, in
  source order. The meaning is the trailing comment on the statement's lines (continued by
  comment-only lines aligned under it), else the comment block directly above the statement."""
  source = textwrap.dedent(inspect.getsource(config_base.base_config))
  comments, alone = _comment_lines(source)
  out = []
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    parts, target = [], node.targets[0]
    while isinstance(target, ast.Attribute):
      parts.append(target.attr)
      target = target.value
    if not (isinstance(target, ast.Name) and target.id == "c" and parts):
      continue
    key = ".".join(reversed(parts))
    section = isinstance(node.value, ast.Call) and ast.unparse(node.value.func).endswith(
        "ConfigDict")
    trailing = [ln for ln in range(node.lineno, node.end_lineno + 1)
                if ln in comments and ln not in alone]
    if trailing:
      column, text = comments[trailing[0]]
      words, ln = [text], node.end_lineno + 1
      while ln in alone and comments[ln][0] == column:
        words.append(comments[ln][1])
        ln += 1
    else:
      words, ln = [], node.lineno - 1
      while ln in alone:
        words.insert(0, comments[ln][1])
        ln -= 1
    out.append((node.lineno, key, section, " ".join(words)))
  return [(key, section, meaning) for _, key, section, meaning in sorted(out)]


def _config_modules(configs_dir: str) -> list[tuple[str, str, tuple[str, ...]]]:
  """(file name, first docstring paragraph, variants) of each `configs/*.py`. Variants: the
  module's `VARIANTS` tuple, else the quoted names after 'Variants' in its docstring."""
  rows = []
  for name in sorted(os.listdir(configs_dir)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    with open(os.path.join(configs_dir, name), encoding="utf-8") as f:
      tree = ast.parse(f.read())
    doc = ast.get_docstring(tree) or ""
    if not doc:
      raise ConfigError(f"configs/{name}: no module docstring (the configs reference needs one)")
    variants = None
    for node in tree.body:
      if (isinstance(node, ast.Assign) and len(node.targets) == 1
          and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "VARIANTS"):
        variants = tuple(ast.literal_eval(node.value))
    if variants is None:
      after = doc.split("Variants", 1)[1] if "Variants" in doc else ""
      variants = tuple(dict.fromkeys(re.findall(r"'([A-Za-z0-9_]+)'", after)))
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    rows.append((name, summary, variants))
  return rows


def _cell(text: str) -> str:
  """Text for a Markdown table cell (pipes escaped)."""
  return text.replace("|", "\\|")


def reference_markdown() -> str:
  """docs/configs.md: every key of `base_config` with its default and meaning, read from
  config_base.py's source, and the shipped configs with their variants. ConfigError for a key
  without a meaning (so every key stays documented)."""
  c = config_base.base_config()
  assigned = _assigned_keys()
  leaves = {".".join(k) for k in leaf_paths(c)}
  found = {key for key, section, _ in assigned if not section}
  if leaves != found:
    raise ConfigError(f"config_base.base_config: keys not set as `c.<key> = value  # meaning`: "
                      f"{sorted(leaves ^ found)}")
  problems, tables, intros = [], {"": []}, {"": "Keys at the top of the config."}
  for key, section, meaning in assigned:
    if section:
      tables[key], intros[key] = [], meaning
      continue
    extra = _MEANINGS_WITHOUT_COMMENT.get(key)
    if meaning and extra:
      problems.append(f"{key} has a comment in base_config now; delete its entry from "
                      "_MEANINGS_WITHOUT_COMMENT")
    meaning = meaning or extra
    if not meaning:
      problems.append(f"{key} has no trailing comment in base_config")
    if key not in config_ranges.RANGES:
      problems.append(f"{key} has no rule in config_ranges.RANGES")
    allowed = config_ranges.RANGES[key][1] if key in config_ranges.RANGES else ""
    parent = key.rpartition(".")[0]
    tables[parent].append(f"| `{key}` | `{_cell(repr(config_ranges.get_key(c, key)))}` "
                          f"| {_cell(meaning or '')} | {_cell(allowed)} |")
  stale = sorted(set(_MEANINGS_WITHOUT_COMMENT) - found)
  stale_ranges = sorted(set(config_ranges.RANGES) - found)
  if stale_ranges:
    problems.append(f"RANGES names keys that base_config lacks: {stale_ranges}")
  if stale:
    problems.append(f"_MEANINGS_WITHOUT_COMMENT names keys that base_config lacks: {stale}")
  if problems:
    raise ConfigError("config_reference: " + "; ".join(problems))
  configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs")
  lines = [
      "# Configs",
      "",
      "<!-- Generated by `python -m cf3d_jax.config_reference --write docs/configs.md` from",
      "     cf3d_jax/config_base.py, config_ranges.py and configs/*.py; edit those, then "
      "regenerate. -->",
      "",
      "Every config is an `ml_collections.ConfigDict` built in Python. `configs/*.py` each define",
      "`get_config(arg=None)`, which starts from `cf3d_jax.config_base.base_config()` (the keys",
      "below, with their defaults) and overrides a few; `arg` picks variants "
      "(`--config=configs/demo.py:smoke`,",
      "comma-separated where a file allows several). On the command line any key can be "
      "overridden",
      "with `--config.<key>=value` (`--config.train.num_steps=100`, "
      "`--config.mesh.shape=2,1,1`).",
      "The CLI locks the config, so a misspelt key is an error naming it rather than a new key;",
      "`config_base.validate` then checks, before a mode writes anything, every key against",
      "its *allowed* range below (and the conditions between keys) and raises one `ConfigError`",
      "naming each key outside it (docs/reliability.md). Notebooks and tests load a file by path with",
      "`config_base.load_config_file(path, arg)` (unlocked). Objective presets "
      "(`apply_objective_preset`:",
      f"{', '.join(f'`{p}`' for p in config_base.OBJECTIVE_PRESETS)}) and datasets "
      f"(`apply_dataset`: {', '.join(f'`{d}`' for d in config_base.DATASET_DEFAULTS)})",
      "set several keys at once.",
      "",
      "## Shipped configs",
      "",
      "| config | what | variants (`--config=FILE:VARIANT`) |",
      "| --- | --- | --- |",
  ]
  for name, summary, variants in _config_modules(configs_dir):
    shown = ", ".join(f"`{v}`" for v in variants) or "none"
    lines.append(f"| [`configs/{name}`](../configs/{name}) | {_cell(summary)} | {shown} |")
  for section, rows in tables.items():
    if not rows:
      continue
    lines += ["", f"## config.{section}" if section else "## config (top level)", ""]
    if intros[section]:
      lines += [intros[section], ""]
    lines += ["| key | default | meaning | allowed |", "| --- | --- | --- | --- |"] + rows
  return "\n".join(lines) + "\n"


def leaf_paths(c: ml_collections.ConfigDict,
               prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  """Dotted paths (as tuples) of every non-ConfigDict value of `c`."""
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaf_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description="Prints the configs reference (docs/configs.md).")
  parser.add_argument("--write", metavar="PATH", help="write it to PATH (atomically) instead")
  args = parser.parse_args()
  text = reference_markdown()
  if args.write:
    from cf3d_jax.files import write_text
    write_text(args.write, text)
  else:
    print(text, end="")
