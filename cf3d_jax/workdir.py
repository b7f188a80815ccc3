"""The layout of a run folder (`--workdir`): one place that names every path inside it."""

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Workdir:
  """Paths inside the run folder `root`; building one touches no files."""
  root: str

  @property
  def data(self) -> str:
    """`data/`: everything `--mode=prepare` and `--mode=prepare_latents` write."""
    return os.path.join(self.root, "data")

  @property
  def records(self) -> str:
    """`data/records`: the image record shards."""
    return os.path.join(self.data, "records")

  @property
  def latents(self) -> str:
    """`data/latents`: the latent record shards `prepare_latents` writes."""
    return os.path.join(self.data, "latents")

  @property
  def table(self) -> str:
    """`data/text_table.npz`: the prompt embedding table."""
    return os.path.join(self.data, "text_table.npz")

  @property
  def reference(self) -> str:
    """`data/reference.npz`: the phantom reference."""
    return os.path.join(self.data, "reference.npz")

  def train_records(self, space_name: str) -> str:
    """The shards training reads: `latents` for the latent space, `records` otherwise."""
    return self.latents if space_name == "latent" else self.records

  @property
  def checkpoints(self) -> str:
    """`checkpoints/`: the diffusion model's Orbax steps."""
    return os.path.join(self.root, "checkpoints")

  @property
  def samples(self) -> str:
    """`samples/`: the counterfactuals `--mode=sample` writes."""
    return os.path.join(self.root, "samples")

  @property
  def samples_source(self) -> str:
    """`samples_source/`: counterfactuals of real source scans."""
    return os.path.join(self.root, "samples_source")

  @property
  def eval(self) -> str:
    """`eval/`: `--mode=evaluate`'s results."""
    return os.path.join(self.root, "eval")

  @property
  def autoencoder(self) -> str:
    """`autoencoder/`: `--mode=train_autoencoder`'s run (checkpoints, tensorboard, vae)."""
    return os.path.join(self.root, "autoencoder")

  @property
  def vae(self) -> str:
    """`autoencoder/vae`: the trained VAE in the converted-weights format."""
    return os.path.join(self.autoencoder, "vae")

  @property
  def classifier(self) -> str:
    """`classifier/`: the evaluation classifier."""
    return os.path.join(self.root, "classifier")

  @property
  def logs(self) -> str:
    """`logs/`: the console logs."""
    return os.path.join(self.root, "logs")

  @property
  def tensorboard(self) -> str:
    """`tensorboard/`: the diffusion trainer's metric writer."""
    return os.path.join(self.root, "tensorboard")

  @property
  def curve(self) -> str:
    """`curve/`: the guidance curve's outputs."""
    return os.path.join(self.root, "curve")

  @property
  def notebook(self) -> str:
    """`notebook/`: the notebook helpers' outputs."""
    return os.path.join(self.root, "notebook")
