"""Text conditioning: prompt templates, offline text encoders and the embedding table.

`prompts` and `table` need only NumPy and are re-exported here. The torch encoders
(`cf3d_jax.text.encoders`) and the offline CLI (`python -m cf3d_jax.text.embed`) are imported
explicitly, so that training and sampling run without torch or transformers installed.
"""

from cf3d_jax.text.prompts import ADNI_CLASSES
from cf3d_jax.text.prompts import canonical_prompt
from cf3d_jax.text.prompts import CLASSES
from cf3d_jax.text.prompts import DATASETS
from cf3d_jax.text.prompts import DEFAULT_TEMPLATES
from cf3d_jax.text.prompts import diagnosis_class
from cf3d_jax.text.prompts import HELDOUT_TEMPLATES
from cf3d_jax.text.prompts import lesion_class
from cf3d_jax.text.prompts import MS_CLASSES
from cf3d_jax.text.prompts import NULL_PROMPT
from cf3d_jax.text.prompts import prompts_for
from cf3d_jax.text.table import builtin_table_names
from cf3d_jax.text.table import builtin_table_path
from cf3d_jax.text.table import EmbeddingTable
from cf3d_jax.text.table import load_table

__all__ = [
    'ADNI_CLASSES', 'CLASSES', 'DATASETS', 'DEFAULT_TEMPLATES', 'EmbeddingTable',
    'HELDOUT_TEMPLATES', 'MS_CLASSES', 'NULL_PROMPT', 'builtin_table_names',
    'builtin_table_path', 'canonical_prompt', 'diagnosis_class', 'lesion_class', 'load_table',
    'prompts_for',
]
