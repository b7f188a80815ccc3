"""`python -m cf3d_jax.convert medicalnet IN OUT --depth 50`: a MedicalNet (Med3D) 3D ResNet
checkpoint (e.g. `resnet_50_23dataset.pth`, the FID feature network of wdm-3d) → the flax
`cf3d_jax.models.resnet3d.MedicalNetResNet` variables `{'params', 'batch_stats'}`.
"""

from __future__ import annotations

import argparse
from typing import Any

from cf3d_jax.convert import Converter
from cf3d_jax.models import resnet3d


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--depth', type=int, default=50, choices=list(resnet3d.DEPTHS),
                      help='ResNet depth (default: %(default)s, resnet_50_23dataset)')
  parser.add_argument('--shortcut-type', choices=['A', 'B'], default=None,
                      help="shortcut type (default: MedicalNet's released setting for the depth)")


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
  return {'depth': int(args.depth), 'shortcut_type': args.shortcut_type}


def _abstract(config) -> Any:
  model = resnet3d.build_resnet3d(config['depth'], config.get('shortcut_type'))
  return resnet3d.abstract_variables(model)


CONVERTER = Converter(
    name='medicalnet',
    description='MedicalNet / Med3D 3D ResNet → cf3d_jax.models.resnet3d (FID features)',
    add_arguments=_add_arguments,
    model_config=_model_config,
    convert=lambda sd, config, source: resnet3d.convert_medicalnet_state_dict(
        sd, config['depth'], config.get('shortcut_type')),
    abstract_params=_abstract,
)
