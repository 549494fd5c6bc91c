"""Ops files (grafana/, deploy/, Dockerfile) checked with the real tools, and the Prometheus harness."""
