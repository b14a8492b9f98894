"""fastinstructor on a Ray cluster (the ``ray`` extra: ``pip install 'fastinstructor[ray]'``); the only package
that imports Ray (``shipping``, ``dataset``, ``serving``).

- ``Embedder``: a callable class for ``ray.data.Dataset.map_batches``: one ``fastinstructor.load`` per actor
  (threads from the CPUs Ray assigned it), batches in pyarrow, pandas or numpy form, an ``embedding`` column added;
  one instruction for every row or an instruction column.
- ``ship_model`` / ``ship_folder``: the model resolved once on the driver (a hub id downloaded there) and made
  available to every worker as a folder: its files go into Ray's object store (256 MiB objects) and each node
  unpacks them once into ``$FASTINSTRUCTOR_CACHE/ray/<sha256 of the files>/<folder name>`` (under a file lock,
  every byte checked against that sha256), or, with ``shared_filesystem=True``, the workers use the driver's path
  as is (a cluster whose nodes mount the same filesystem). An ONNX export is shipped the same way: export it once
  (``fastinstructor export``) and pass ``onnx_dir=ship_folder(DIR)``; no node then exports again.
- ``embed_dataset``: the embed job on the cluster (``fastinstructor embed --engine ray``), one local job per part.
- ``serve_app`` / ``run_server``: a Ray Serve deployment of the server application of ``fastinstructor.server``
  (``fastinstructor serve --engine ray``): the same routes, limits and metrics, per replica; replicas and
  autoscaling are Ray Serve's.
"""

try:
    import ray  # noqa: F401
except ImportError:  # pragma: no cover - the extra is missing
    raise ImportError("fastinstructor.ray needs Ray: pip install 'fastinstructor[ray]'") from None

from .dataset import Embedder, embed_dataset
from .serving import DEPLOYMENT, run_server, serve_app
from .shipping import ShippedFolder, actor_threads, load_on_worker, ship_folder, ship_model

__all__ = [
    "DEPLOYMENT",
    "Embedder",
    "ShippedFolder",
    "actor_threads",
    "embed_dataset",
    "load_on_worker",
    "run_server",
    "serve_app",
    "ship_folder",
    "ship_model",
]
