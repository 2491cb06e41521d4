"""Airflow's REST API as an operator's script uses it: a JWT from /auth/token (the simple auth manager's
admin), then /api/v2. Shared by the scheduler and cluster tests and bench/scale.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class AirflowRest:
    def __init__(self, url: str, password: str) -> None:
        self.url = url
        self.token = self.call("POST", "/auth/token", {"username": "admin", "password": password},
                               auth=False)["access_token"]

    def call(self, method: str, path: str, body: dict | None = None, *, auth: bool = True) -> Any:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: HTTP {e.code} {e.read()[:2000]!r}") from None
