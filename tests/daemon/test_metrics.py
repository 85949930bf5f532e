"""The daemon's Prometheus endpoint: served on loopback, stopped cleanly."""

from __future__ import annotations

import urllib.request

from pvc_node_daemon.metrics import Metrics


def test_serve_then_stop_ends_the_server_and_keeps_the_metrics():
    metrics = Metrics("node1")
    metrics.serve("127.0.0.1", 0)
    server, thread = metrics._server
    port = server.server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert b"pvc_fences_total" in response.read()
    before = metrics.fences
    metrics.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert metrics._server is None
    assert metrics.fences is before  # stopping registers nothing again
    metrics.stop()  # a second stop does nothing
