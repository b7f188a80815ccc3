"""Notebook session, part 4: the slice viewer.

`show_slices(cf)` shows the volumes side by side over their difference maps: a slider viewer
(ipywidgets) where a frontend draws widgets (Colab, Jupyter, VS Code), else a static montage of
five slices (nbclient, plain consoles). The figures themselves are `cf3d_jax.figures`'.
"""

from __future__ import annotations

import os
import sys

from cf3d_jax.errors import ConfigError
from cf3d_jax.figures import AXES, figure_png, montage_figure, slice_figure
from cf3d_jax.notebook.counterfactuals import Counterfactuals, panels

VIEWER_MODES = ("auto", "widget", "static")


def _importable(module: str) -> bool:
  """Whether `module` can be imported (without importing it)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def frontend_renders_widgets() -> bool:
  """Whether widgets will be drawn: ipywidgets importable and a widget frontend known to be
  attached (Colab, a Jupyter server session, VS Code). False under nbclient/nbconvert and in
  plain consoles, where a widget would show only its text form."""
  if not _importable("ipywidgets"):
    return False
  if "google.colab" in sys.modules:
    return True
  return bool(os.environ.get("JPY_SESSION_NAME") or os.environ.get("VSCODE_PID")
              or any(k.startswith("VSCODE_") for k in os.environ))


def viewer_mode(mode: str = "auto") -> str:
  """'widget' or 'static' for `mode` ('auto' asks `frontend_renders_widgets`). ConfigError for
  an unknown mode; 'widget' without ipywidgets falls back to 'static'."""
  if mode not in VIEWER_MODES:
    raise ConfigError(f"viewer mode {mode!r}: expected one of {list(VIEWER_MODES)}")
  if mode == "static":
    return "static"
  if mode == "widget":
    return "widget" if _importable("ipywidgets") else "static"
  return "widget" if frontend_renders_widgets() else "static"


def slice_widget(cf: Counterfactuals, axis: str = "axial"):
  """ipywidgets VBox: view and slice controls above a PNG of `slice_figure`, redrawn on change."""
  import ipywidgets as w  # pylint: disable=g-import-not-at-top
  vols, titles, diffs, dtitles = panels(cf)
  view = w.Dropdown(options=list(AXES), value=axis, description="view")
  sizes = {a: vols[0].shape[AXES[a]] for a in AXES}
  slider = w.IntSlider(value=sizes[axis] // 2, min=0, max=sizes[axis] - 1, description="slice",
                       continuous_update=False)
  image = w.Image(format="png")

  def redraw(*_):
    image.value = figure_png(slice_figure(vols, titles, diffs, dtitles, view.value, slider.value))

  def on_view(change):
    slider.max = sizes[change["new"]] - 1
    slider.value = min(slider.value, slider.max)
    redraw()

  view.observe(on_view, names="value")
  slider.observe(redraw, names="value")
  redraw()
  return w.VBox([w.HBox([view, slider]), image])


def show_slices(cf: Counterfactuals, mode: str = "auto", axis: str = "axial") -> str:
  """Displays the volumes side by side with their difference maps in the notebook: a slider
  viewer (mode 'widget') or a static montage of five slices (mode 'static'); 'auto' picks by
  `frontend_renders_widgets`. Returns the mode used."""
  from IPython.display import Image, display  # pylint: disable=g-import-not-at-top
  mode = viewer_mode(mode)
  if mode == "widget":
    if "google.colab" in sys.modules:
      from google.colab import output  # pylint: disable=g-import-not-at-top
      output.enable_custom_widget_manager()
    display(slice_widget(cf, axis))
  else:
    display(Image(data=figure_png(montage_figure(*panels(cf), axis=axis))))
  return mode
