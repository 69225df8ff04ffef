"""The ``driver`` fixture: a client test that takes it runs on both ``Client`` and ``AsyncClient``."""

from __future__ import annotations

import pytest
from drivers import DRIVERS, Driver


@pytest.fixture(params=DRIVERS, ids=str)
def driver(request: pytest.FixtureRequest) -> Driver:
    return request.param  # type: ignore[no-any-return]
