"""fastinstructor: fast, exact INSTRUCTOR text embeddings.

>>> import fastinstructor
>>> model = fastinstructor.load("hkunlp/instructor-large")          # or a checkpoint folder
>>> model.encode([["Represent the Science title:", "3D ActionSLAM: wearable person tracking"]])
"""

from .checkpoint import CheckpointError
from .model import Instructor, load

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Instructor", "load", "__version__"]
