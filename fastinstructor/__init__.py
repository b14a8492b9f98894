"""fastinstructor: fast, exact INSTRUCTOR text embeddings.

>>> import fastinstructor
>>> model = fastinstructor.load("hkunlp/instructor-large")          # or a checkpoint folder
>>> model.encode([["Represent the Science title:", "3D ActionSLAM: wearable person tracking"]])
"""

from .checkpoint import CheckpointError
from .corpus import CorpusError, embed_corpus, read_embeddings
from .model import Instructor, load
from .vectors import quantize_embeddings
from .version import __version__

__all__ = [
    "CheckpointError",
    "CorpusError",
    "Instructor",
    "embed_corpus",
    "load",
    "quantize_embeddings",
    "read_embeddings",
    "__version__",
]
