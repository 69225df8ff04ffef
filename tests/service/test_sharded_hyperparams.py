"""A sharded session on the Ray store (in this process's local Ray) whose shards came to hold different
hyperparameters (a PATCH that reached only some shards before a host failed) steps nowhere until the change is sent
again: the leader compares the shards' hyperparameters in the dry run that precedes every step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
from stores import ray_settings

from optserve.client import Client
from optserve.client.errors import Conflict
from optserve.service.auth import ADMIN
from optserve.service.cluster import directory_get
from optserve.service.embedded import serve_in_thread

pytestmark = pytest.mark.usefixtures("ray_cluster")  # with the other tests on this process's Ray (tests/conftest.py)


def test_shards_with_different_hyperparameters_refuse_the_step_until_the_change_is_sent_again(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    settings = ray_settings(request, tmp_path / "data")
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((40, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    with serve_in_thread(settings=settings, start_timeout=300) as embedded, Client(embedded.url) as client:
        try:
            sid = client.create_session(params, "adamw", hyperparams={"lr": 0.01}, shards=2)["id"]
            twin = client.create_session(params, "adamw", hyperparams={"lr": 0.01})["id"]
            for sess in (sid, twin):
                client.step(sess, grads[0])
            # a PATCH that reached shard 1 only: what a host failing between the shards' changes leaves
            host = ray.get_actor(directory_get(settings.ray_namespace, f"{sid}#1"), namespace=settings.ray_namespace)
            ray.get(host.patch.remote(ADMIN, f"{sid}#1", {"lr": 0.5}, None), timeout=60)
            with pytest.raises(Conflict, match="different hyperparameters"):
                client.step(sid, grads[1])
            assert client.session(sid)["step"] == 1  # nothing applied anywhere
            for sess in (sid, twin):
                client.update_hyperparams(sess, lr=0.5)  # the change sent again: every shard holds it
                answer = client.step(sess, grads[1])
                assert answer.step == 2
            (step_a, a), (step_b, b) = client.params(sid), client.params(twin)
            assert step_a == step_b == 2
            for name in params:
                np.testing.assert_array_equal(a[name], b[name])
        finally:
            embedded.store.destroy()  # type: ignore[attr-defined]
