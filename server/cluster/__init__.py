"""loraplex on Ray Serve, past one GPU: ``server.cluster.app:build`` (``serve run
deploy/ray/serve.yaml``), or ``python -m server --replicas N`` on one host."""
