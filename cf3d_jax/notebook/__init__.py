"""The logic behind `notebooks/sample_counterfactuals.ipynb`, as small tested functions.

A notebook session runs (`nb` = this package; each name is defined in the submodule given):
  `load_generator(WORKDIR, CONFIG)`          restore the trained U-Net (EMA by default) and table
                                             (`session`);
  `prepare_prompts(gen.table, PROMPTS)`      table rows for known prompts; other prompts encoded
                                             with the table's own encoder (`table_encoder`) when it
                                             can be loaded, else replaced by the closest table
                                             prompt — `PromptSet.describe()` says which happened
                                             (`prompts`);
  `generate(gen, prompt_set, GUIDANCE, SEED)` one fixed noise (`generate.subject_noise`)
                                             decoded under every prompt (`generate.generate`);
                                             `invert_scan`: counterfactuals of a given scan
                                             (`counterfactuals`);
  `difference_maps`, `show_slices`           side-by-side slice viewer (ipywidgets) with a
                                             static matplotlib montage where no frontend renders
                                             widgets (nbclient, plain consoles) (`viewer`; the
                                             figures are `cf3d_jax.figures`');
  `save_nifti`, `offer_download`             NIfTI files written atomically into the workdir,
                                             zipped, downloaded on Colab (`downloads`).

The notebook's cells and tests/test_notebook.py call everything through this one namespace, so
the public names of the submodules are gathered here.

Volumes are float32 `[D, H, W]` in [-1, 1] (RAS: D = x, H = y, W = z); stacks of them `[P, D, H,
W]`. Sampling itself goes through `cf3d_jax.generate` (no second implementation here), so a
notebook counterfactual of subject k at seed s equals the CLI's `samples/g{w}/subject_k` volume
for the same prompt, checkpoint and config (up to float rounding across batch sizes).
"""

from cf3d_jax.notebook.counterfactuals import (Counterfactuals, difference_maps, generate,
                                               invert_scan, panels, psnr_to)
from cf3d_jax.notebook.downloads import offer_download, output_dir, save_nifti, zip_files
from cf3d_jax.notebook.prompts import (PromptSet, choose_prompts, closest_table_prompt,
                                       encode_prompts, prepare_prompts, split_prompts,
                                       table_encoder)
from cf3d_jax.notebook.session import (Generator, config_spec, find_path, has_checkpoint,
                                       load_config, load_generator, repo_root, resolve_workdir,
                                       run_cli)
from cf3d_jax.notebook.viewer import (VIEWER_MODES, frontend_renders_widgets, show_slices,
                                      slice_widget, viewer_mode)

__all__ = [
    "Counterfactuals", "difference_maps", "generate", "invert_scan", "panels", "psnr_to",
    "offer_download", "output_dir", "save_nifti", "zip_files",
    "PromptSet", "choose_prompts", "closest_table_prompt", "encode_prompts", "prepare_prompts",
    "split_prompts", "table_encoder",
    "Generator", "config_spec", "find_path", "has_checkpoint", "load_config", "load_generator",
    "repo_root", "resolve_workdir", "run_cli",
    "VIEWER_MODES", "frontend_renders_widgets", "show_slices", "slice_widget", "viewer_mode",
]
