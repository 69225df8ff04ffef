"""Locust load test of optserve: each simulated user creates its own session, then posts binary (safetensors) steps.

    pip install locust
    locust -f locustfile.py --headless -u 16 -r 4 -t 30s --host http://127.0.0.1:8000

Settings from the environment: OPTSERVE_LOCUST_PARAMS (parameters per session, default 100000),
OPTSERVE_TOKEN (the admin key when the server has auth on; each user then steps with its session's own token).
"""

from __future__ import annotations

import json
import os

import numpy as np
from locust import task
from locust.contrib.fasthttp import FastHttpUser

from optserve.client import wire

PARAMS = int(os.environ.get("OPTSERVE_LOCUST_PARAMS", "100000"))
ADMIN_TOKEN = os.environ.get("OPTSERVE_TOKEN")


class OptimizerUser(FastHttpUser):
    """A training client: one session, then steps with If-Match, as the client library sends them."""

    def on_start(self) -> None:
        rng = np.random.default_rng()
        headers = {"Content-Type": wire.SAFETENSORS}
        if ADMIN_TOKEN:
            headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        body = wire.encode({"w": np.zeros(PARAMS, np.float32)}, {"config": json.dumps({"optimizer": "adamw"})})
        with self.client.post("/v1/sessions", data=body, headers=headers, name="create", catch_response=True) as r:
            if r.status_code != 201:
                r.failure(f"create answered {r.status_code}")
                raise RuntimeError("could not create a session")
            info = r.json()
        self.session_id = info["id"]
        self.step_number = info["step"]
        self.headers = {"Content-Type": wire.SAFETENSORS, "Accept": wire.SAFETENSORS}
        if info.get("token"):
            self.headers["Authorization"] = f"Bearer {info['token']}"
        self.body = wire.encode({"w": rng.standard_normal(PARAMS, dtype=np.float32) * 1e-3})

    @task
    def step(self) -> None:
        headers = {**self.headers, "If-Match": f'"{self.step_number}"'}
        with self.client.post(
            f"/v1/sessions/{self.session_id}/step", data=self.body, headers=headers, name="step", catch_response=True
        ) as r:
            if r.status_code == 200:
                self.step_number = int(r.headers["ETag"].strip('"'))
            else:
                r.failure(f"step answered {r.status_code}")

    def on_stop(self) -> None:
        self.client.delete(f"/v1/sessions/{self.session_id}", headers=self.headers, name="delete")
