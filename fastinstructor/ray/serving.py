"""A Ray Serve deployment of the server application of ``fastinstructor.server``: ``serve_app``, ``run_server``
and ``fastinstructor serve --engine ray`` (``serve_from_values``)."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import ray

from .shipping import ShippedFolder, load_on_worker, ship_model

__all__ = ["DEPLOYMENT", "run_server", "serve_app", "serve_from_values"]

DEPLOYMENT = "fastinstructor"  # the Ray Serve application's and deployment's name


class _Replica:
    """One Ray Serve replica: the model loaded once, the server application of ``fastinstructor.server`` around it
    (built by Ray Serve through ``__serve_build_asgi_app__`` once the model is loaded)."""

    def __init__(self, model: ShippedFolder, settings, name: str, options: dict) -> None:
        self.model = load_on_worker(model, **options)
        self.settings, self.name = settings, name

    def __serve_build_asgi_app__(self):
        from ..server import create_app

        return create_app(self.model, self.settings, model_name=self.name)


def serve_app(
    model: ShippedFolder | str | os.PathLike,
    settings=None,
    *,
    model_name: str | None = None,
    replicas: int = 1,
    max_replicas: int | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    shared_filesystem: bool = False,
    **load_options,
):
    """The Ray Serve application (``Deployment.bind``) serving ``model`` with the server application of
    ``fastinstructor.server`` in each replica: pass it to ``ray.serve.run``. ``settings``: a ``ServerSettings``;
    ``model_name``: the name clients see (default as ``fastinstructor serve``'s); ``replicas``, or autoscaling
    from ``replicas`` to ``max_replicas``; ``num_cpus`` / ``num_gpus`` per replica (its threads: its CPUs);
    ``load_options``: ``backend``, ``precision``, ``max_seq_length``, ... as ``fastinstructor.load``. A replica takes
    up to ``settings.max_connections`` requests at once (Ray Serve's ``max_ongoing_requests``): they queue in its own
    batcher, which forms the batches."""
    from ray import serve

    from ..server.settings import ServerSettings, served_name

    settings = settings or ServerSettings()
    if isinstance(model, ShippedFolder):
        name = model_name or served_name(model.source or model.name)  # a hub id, not its snapshot's commit
    else:
        name = model_name or served_name(str(model))
        model = ship_model(model, shared_filesystem=shared_filesystem)
    if max_replicas is not None and max_replicas < replicas:
        raise ValueError(f"max_replicas ({max_replicas}) is below replicas ({replicas})")
    scaling: dict = {"num_replicas": replicas}
    if max_replicas is not None and max_replicas > replicas:
        scaling = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas}}
    deployment = serve.deployment(
        serve.ingress()(_Replica),
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=settings.max_connections,
        **scaling,
    )
    return deployment.bind(model, settings, name, load_options)


def run_server(
    model: ShippedFolder | str | os.PathLike,
    settings=None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    **options,
) -> str:
    """Deploy ``serve_app(model, settings, **options)`` on the cluster at ``address`` (``auto``: the running one; none:
    a new local cluster, or the one this process is connected to), Ray Serve's HTTP proxy listening on ``host:port``;
    returns its URL once every replica has loaded the model. ``ray.serve.delete("fastinstructor")`` removes it. A model
    shipped through the object store lives as long as this driver: keep it connected while replicas may start
    (autoscaling, a replica replaced), or pass ``shared_filesystem=True``."""
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(serve_app(model, settings, **options), name=DEPLOYMENT, route_prefix="/")
    return f"http://{host}:{port}"


def serve_from_values(values: dict, settings) -> int:
    """``fastinstructor serve --engine ray``: ``run_server`` with the command line's values (``server.settings``'
    ``resolve``), until Ctrl-C, which removes the deployment (and stops the cluster if it started one)."""
    from ray import serve

    from ..server.settings import served_name

    name = values["served_model_name"] or served_name(values["model"])
    scaling = f"{values['replicas']}" + (f" to {values['max_replicas']}" if values["max_replicas"] else "")
    print(f"starting {scaling} Ray Serve replica(s) of {values['model']} as {name!r} ...", file=sys.stderr)
    deploying = False  # True once this command deploys: before that, an application of this name is not ours
    try:
        if not ray.is_initialized():
            ray.init(address=values["address"], include_dashboard=False)
        model = ship_model(values["model"])  # first: a model that cannot be found must remove nothing
        if DEPLOYMENT in serve.status().applications:  # serve.run would replace it (its name and route are ours)
            raise ValueError(
                f"a {DEPLOYMENT!r} Ray Serve application already runs on this cluster (another `serve --engine "
                "ray`?): stop that one (Ctrl-C, or ray.serve.delete('fastinstructor')) or serve on another cluster"
            )
        deploying = True
        url = run_server(
            model,
            settings,
            host=values["host"],
            port=values["port"],
            address=values["address"],
            model_name=name,
            replicas=values["replicas"],
            max_replicas=values["max_replicas"],
            num_cpus=values["replica_cpus"],
            num_gpus=values["replica_gpus"],
            backend=values["backend"],
            precision=values["precision"],
            max_seq_length=values["max_seq_length"],
            threads=values.get("threads"),  # default: the replica's CPUs
        )
        keys = "on" if settings.api_keys else "off"
        print(f"serving {name!r} on {url} with Ray Serve (API keys: {keys}); Ctrl-C removes it", file=sys.stderr)
        while True:
            time.sleep(3600)
    finally:  # also when interrupted while the replicas start
        if ray.is_initialized():
            if deploying:
                with contextlib.suppress(Exception):  # Serve never started: nothing to remove
                    serve.delete(DEPLOYMENT)
            ray.shutdown()
