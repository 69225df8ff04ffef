"""Servers on the stores the HTTP suite runs against (see tests/service/conftest.py)."""

from __future__ import annotations

import uuid

import pytest

from optserve.service.settings import Settings


def ray_settings(request: pytest.FixtureRequest, data_dir: object, **settings: object) -> Settings:
    """Settings of a front on the test process's Ray cluster, in a namespace of its own (its own hosts, limits and
    directory)."""
    request.getfixturevalue("ray_cluster")
    return Settings(store="ray", data_dir=data_dir, ray_namespace=f"test-{uuid.uuid4().hex[:8]}", **settings)
