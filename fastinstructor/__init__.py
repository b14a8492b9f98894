"""fastinstructor: fast, exact INSTRUCTOR text embeddings.

>>> import fastinstructor
>>> model = fastinstructor.load("hkunlp/instructor-large")          # or a checkpoint folder
>>> model.encode([["Represent the Science title:", "3D ActionSLAM: wearable person tracking"]])
"""

__version__ = "0.1.0"

from .checkpoint import CheckpointError  # noqa: E402  (corpus reads __version__)
from .corpus import CorpusError, embed_corpus, read_embeddings  # noqa: E402
from .model import Instructor, load  # noqa: E402

__all__ = ["CheckpointError", "CorpusError", "Instructor", "embed_corpus", "load", "read_embeddings", "__version__"]
