"""Cluster DNS for the processes the test kubelet starts (put on their PYTHONPATH).

Names under .svc.cluster.local resolve to the addresses in the JSON file named by
FAKE_CLUSTER_DNS, which the kubelet keeps current (a headless Service: its ready pods), and
to "name not known" when it lists none; every other name resolves as usual.
"""

import json
import os
import socket

_resolve = socket.getaddrinfo
_TABLE = os.environ.get("FAKE_CLUSTER_DNS", "")


def getaddrinfo(host, port, *args, **kwargs):
    if _TABLE and isinstance(host, str) and host.endswith(".svc.cluster.local"):
        try:
            with open(_TABLE) as f:
                addresses = json.load(f).get(host, [])
        except (OSError, ValueError):
            addresses = []
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [info for a in addresses for info in _resolve(a, port, *args, **kwargs)]
    return _resolve(host, port, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
