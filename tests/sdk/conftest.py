"""Starts the real easel binary on 127.0.0.1:0 for the OpenAI Python SDK suite and stops it with SIGTERM."""

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

ADMIN = "sdk-admin-token"

CONFIG = """
auth:
  mode: {mode}
backends:
  sim:
    kind: simulated
  slow:
    kind: simulated
    latency: 3s
    concurrency: {{images: 1}}
    queue: {{depth: 0, wait: 1s}}
  broken:
    kind: simulated
    failure: {{status: 500, message: "CUDA out of memory"}}
models:
  - id: easel-sim
    aliases: [gpt-image-1, dall-e-2]
    backends: [sim]
    default_size: 64x64
    credits: 1
  - id: slow-sim
    backends: [slow]
    default_size: 16x16
  - id: broken-sim
    backends: [broken]
  - id: sim-video
    type: video
    backends: [sim]
    default_size: 64x36
    credits: 2
"""

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Easel:
    def __init__(self, mode):
        self.dir = tempfile.TemporaryDirectory()
        with open(os.path.join(self.dir.name, "easel.yaml"), "w") as f:
            f.write(CONFIG.format(mode=mode))
        binary = os.environ.get("EASEL_BIN")
        assert binary, "set EASEL_BIN to the built easel binary (scripts/test.sh does)"
        env = dict(os.environ, NO_COLOR="1", EASEL_ADMIN_TOKEN=ADMIN)
        env.pop("EASEL_CONFIG", None)
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0"],
            cwd=self.dir.name,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log = []
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                line = ANSI.sub("", line)
                self.log.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout=30):
            self.proc.kill()
            raise RuntimeError("easel did not start:\n" + "".join(self.log))

    def get(self, path, headers=None):
        req = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self.dir.cleanup()
        assert code == 0, f"easel exited {code} after SIGTERM:\n" + "".join(self.log)


@pytest.fixture(scope="session")
def easel():
    e = Easel("none")
    yield e
    e.stop()


@pytest.fixture(scope="session")
def easel_keys():
    e = Easel("keys")
    yield e
    e.stop()


def wait_until(what, cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
