"""The sidecar: a PostgreSQL wire-protocol proxy with transaction pooling and native metrics."""

from __future__ import annotations

from poolkit.sidecar.policy.config import SidecarSettings, load_sidecar_settings

__all__ = ["SidecarSettings", "load_sidecar_settings"]
