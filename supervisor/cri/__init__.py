"""The CRI frontend: Kubernetes' Container Runtime Interface v1 over gRPC (DESIGN §8).

Modules, in the order a request meets them: ``server`` (the gRPC server and
the bridge from its worker threads into trio), ``runtime_service`` and
``image_service`` (the RPC handlers), ``programs`` (a container's program
description from its pod annotation or its CRI config), ``images`` (the
content-addressed store of executables), ``records`` (what the backend does
not keep about a container), ``stats`` (CPU and memory), ``status`` (errors
to gRPC codes), ``main`` (putting it together) and ``cli`` (``capvisor cri
serve``).

Only ``cli`` is imported by the ``capvisor`` command line; the rest needs
grpcio and the CRI messages (the ``cri`` extra: ``pip install 'capvisor[cri]'``).
"""
