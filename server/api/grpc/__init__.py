"""The gRPC front: the Inference and Adapters services over the same Service as HTTP.

``codegen`` makes the stubs from ``proto/`` · ``protocol`` converts messages to
and from the service's types · ``inference`` and ``adapters`` are the
servicers · ``errors`` maps service errors to status codes · ``server`` starts
it all, with health and reflection, on the HTTP server's event loop.
"""
