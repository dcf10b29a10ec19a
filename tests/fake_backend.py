#!/usr/bin/env python3
"""A fake OpenAI-compatible image server for easel's managed-process tests (standard library only).

Serves GET /v1/models, GET /slots, POST /v1/images/generations and a streamed POST /v1/chat/completions on
127.0.0.1:--port. Flags make it misbehave the way real GPU servers do (the names of the working-set design's
fake): slow to load (--load-secs), exit while loading (--exit-during-load), crash after a time or on a request
(--crash-after, --crash-on-request), slow generations (--gen-secs), ignore SIGTERM or take long to stop
(--ignore-sigterm, --slow-stop), leave a grandchild in its process group or in a session of its own
(--fork-grandchild, --setsid-grandchild), stop answering once ready (--hang-after-ready), report work easel did not
submit (--external-busy), and hold a "GPU" file that a second server cannot take until the first has let it go
(--hold-file, --release-delay).
"""

import argparse
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

# A 1x1 PNG.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--load-secs", "--start-delay", dest="start_delay", type=float, default=0.0,
                    help="seconds before the port is bound")
    ap.add_argument("--crash-after", type=float, default=None, help="exit with status 3 after this many seconds")
    ap.add_argument("--crash-on-request", type=int, default=None,
                    help="exit with status 3 on the Nth generation request (1 = the first), before answering it")
    ap.add_argument("--ignore-sigterm", action="store_true")
    ap.add_argument("--slow-stop", type=float, default=0.0, help="seconds between SIGTERM and the exit")
    ap.add_argument("--fork-grandchild", "--grandchild", dest="grandchild", default=None,
                    help="spawn a grandchild in the group, ignoring SIGTERM; write its pid here")
    ap.add_argument("--setsid-grandchild", default=None,
                    help="spawn a grandchild in a session (and group) of its own, ignoring SIGTERM; write its pid here")
    ap.add_argument("--hang-after-ready", type=float, default=None,
                    help="this many seconds after ready, stop answering (requests hang, the port stays open)")
    ap.add_argument("--hold-file", default=None,
                    help="a file standing for GPU memory: exit 1 at start if another live process holds it")
    ap.add_argument("--release-delay", type=float, default=0.0,
                    help="on SIGTERM, keep holding --hold-file this long before letting go and exiting")
    ap.add_argument("--lines", type=int, default=0, help="print this many numbered lines at start")
    ap.add_argument("--gen-secs", type=float, default=0.0, help="seconds one image generation takes")
    ap.add_argument("--record", default=None, help="append `start PID`, `gen begin`, `gen done`, `exit` lines here")
    ap.add_argument("--exit-during-load", "--fail-start", dest="fail_start", action="store_true",
                    help="exit with status 1 while loading")
    ap.add_argument("--external-busy", type=float, default=0.0,
                    help="GET /slots reports a slot processing (work easel did not submit) this long after ready")
    args = ap.parse_args()

    def record(line):
        if args.record:
            with open(args.record, "a") as f:
                f.write(line + "\n")

    def let_go():
        if args.hold_file:
            try:
                with open(args.hold_file) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(args.hold_file)
            except OSError:
                pass

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(*_):
            delay = max(args.slow_stop, args.release_delay)
            if delay:
                record("stopping")
                time.sleep(delay)
            let_go()
            record("exit")
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
    record(f"start {os.getpid()}")
    if args.hold_file:
        try:
            with open(args.hold_file) as f:
                holder = int(f.read().strip() or "0")
        except (OSError, ValueError):
            holder = 0
        if holder and holder != os.getpid() and os.path.exists(f"/proc/{holder}") and not zombie(holder):
            record(f"oom held by {holder}")
            print(f"fake backend: CUDA out of memory (the GPU is held by pid {holder})", flush=True)
            os._exit(1)
        with open(args.hold_file, "w") as f:
            f.write(str(os.getpid()))
    print(f"fake backend pid {os.getpid()} starting on port {args.port}", flush=True)
    for i in range(args.lines):
        print(f"fake line {i}", flush=True)
    print("fake stderr line", file=sys.stderr, flush=True)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
    for path, own_session in ((args.grandchild, False), (args.setsid_grandchild, True)):
        if path:
            child = subprocess.Popen([sys.executable, "-c", code], start_new_session=own_session)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(child.pid))
            os.rename(tmp, path)
    if args.fail_start:
        time.sleep(0.2)
        print("fake backend: CUDA out of memory while loading", flush=True)
        os._exit(1)
    if args.start_delay:
        time.sleep(args.start_delay)
    if args.crash_after is not None:
        def crash():
            print("fake backend crashing", flush=True)
            os._exit(3)
        threading.Timer(args.crash_after, crash).start()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def hang(self):
            if args.hang_after_ready is not None and time.monotonic() >= ready_at + args.hang_after_ready:
                record("hung")
                time.sleep(3600)

        def do_GET(self):
            self.hang()
            if self.path == "/slots":
                busy = time.monotonic() < ready_at + args.external_busy
                said = "slots busy" if busy else "slots idle"
                if said not in reported:
                    reported.add(said)
                    record(said)
                self.answer(200, [{"id": 0, "is_processing": busy}])
            elif self.path == "/v1/models":
                self.answer(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            else:
                self.answer(404, {"error": {"message": "not found"}})

        def do_POST(self):
            self.hang()
            length = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(length)
            if self.path == "/v1/chat/completions":
                record("chat")
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "fake-model",
                         "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()
                self.close_connection = True
            elif self.path == "/v1/images/generations":
                with lock:
                    generations[0] += 1
                    n = generations[0]
                if args.crash_on_request is not None and n >= args.crash_on_request:
                    record("crash on request")
                    print("fake backend crashing on a request", flush=True)
                    os._exit(3)
                record("gen begin")
                time.sleep(args.gen_secs)
                record("gen done")
                self.answer(200, {"created": int(time.time()), "data": [{"b64_json": PNG_B64}]})
            else:
                self.answer(404, {"error": {"message": "not found"}})

    reported = set()
    generations = [0]
    lock = threading.Lock()
    ready_at = time.monotonic()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("fake backend ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
