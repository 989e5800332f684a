"""The real thing: `serve run cluster/config.yaml` as a subprocess, called over HTTP and gRPC, shut down."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_harness import CONFIG, ROOT

pytest.importorskip("ray")


def _serve_cli() -> str:
    cli = Path(sys.executable).with_name("serve")
    return str(cli) if cli.exists() else shutil.which("serve") or "serve"


def _wait_ready(proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve run exited early"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=5)
            conn.request("GET", "/health")  # 200 once both pools run a replica; before, requests get 503
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError("the app did not come up")


def test_serve_run_config_yaml(tmp_path):
    from overfill_serve.tools.default_model import default_model_dir

    model_dir = default_model_dir()  # converted already: the replicas only load it
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "OVERFILL_CACHE_DIR": str(model_dir.parent),
        "RAY_ADDRESS": "local",
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [_serve_cli(), "run", str(CONFIG)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_ready(proc)
        conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=120)
        body = {
            "model": "smollm2-135m",
            "max_tokens": 24,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert "Paris" in json.loads(response.read())["choices"][0]["message"]["content"]

        from overfill_serve.tools.client import GRPCClient

        with GRPCClient("127.0.0.1:9000", application="overfill") as client:
            reply = client.generate(
                "The capital of France is", model="smollm2-135m", max_tokens=8, temperature=0
            )
            assert reply.usage.completion_tokens == 8 and reply.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: serve run shuts the app and Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
