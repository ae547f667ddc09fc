"""A picture of a ``Profiler`` trace opened in TensorBoard's profiler plugin, for the docs page "Where does the time go".

A small MLP trains for a few batches under ``fitkit.callbacks.Profiler`` (``wait=1, warmup=1, active=3``);
TensorBoard is started on the trace folder (on 127.0.0.1 only), headless Chromium opens the "PyTorch Profiler"
tab on its Trace view (the timeline of the recorded steps) and takes a screenshot once the trace is drawn.
TensorBoard and Chromium are stopped afterwards.

Chromium is driven over its DevTools pipe (``--remote-debugging-pipe``, no extra Python package): the plugin's
view list is served with "Trace" first, so the page opens on the timeline. The plugin's page loads two files
from the internet, the Google Charts loader and the Web Components v0 polyfill of the trace viewer; on a machine
without internet, ``--offline POLYFILL`` serves ``webcomponents.min.js`` 0.7.24 from a local file
(``npm pack webcomponents.js@0.7.24``) and an empty Charts loader (the Trace view draws no charts).

Usage::

    pip install torch-tb-profiler          # the TensorBoard profiler plugin
    apt-get install chromium               # headless Chromium (or pass --chromium)
    python benchmarks/profiler_screenshot.py          # writes docs/images/profiler-tensorboard.png
    python benchmarks/profiler_screenshot.py --out /tmp/shot.png --offline package/webcomponents.min.js
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fitkit  # noqa: E402
from fitkit.callbacks import Profiler  # noqa: E402

PLUGIN = "/data/plugin/pytorch_profiler"
CHARTS_STUB = b"window.google = {charts: {load: function () { return Promise.resolve(); }}};"


def make_traces(dirpath: Path) -> list[Path]:
    """Trains a small MLP for one short epoch under ``Profiler`` and returns the trace files it wrote."""
    torch.manual_seed(0)
    x = torch.randn(1024, 64)
    y = torch.randint(0, 10, (1024,))
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    profiler = Profiler(dirpath, wait=1, warmup=1, active=3, record_shapes=True)
    trainer = fitkit.Trainer(model, "adam", "cross_entropy", callbacks=[profiler], verbose=0)
    trainer.fit((x, y), batch_size=64, epochs=1)
    return profiler.traces


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_for_run(base: str, timeout: float = 120.0) -> str:
    """Waits until TensorBoard answers and its profiler plugin lists a run; returns the run's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            runs = get_json(f"{base}{PLUGIN}/runs")
            if runs["runs"] and not runs.get("loading"):
                return runs["runs"][0]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"TensorBoard's profiler plugin listed no run within {timeout:.0f} s")


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe`` (JSON messages ended by NUL, fds 3 and 4)."""

    def __init__(self, chromium: str, flags: list[str]) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def as_fds_3_and_4() -> None:
            read_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [chromium, "--remote-debugging-pipe", *flags, "about:blank"],
            preexec_fn=as_fds_3_and_4,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.on_event: Any = None

    def _read(self, timeout: float) -> dict | None:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def pump(self, seconds: float) -> None:
        """Handles the events that arrive within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self._read(left)
            if message is not None and "method" in message and self.on_event:
                self.on_event(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        number = self._next_id  # events handled while waiting may call too
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(120.0)
            if reply is None:
                raise TimeoutError(f"no answer to {method}")
            if reply.get("id") == number:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply and self.on_event:
                self.on_event(reply)

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def screenshot(
    chromium: str, base: str, run: str, out: Path, size: tuple[int, int], polyfill: Path | None, settle: float
) -> None:
    """Opens the plugin's Trace view of ``run`` in headless Chromium and writes a PNG of the page to ``out``."""
    views = get_json(f"{base}{PLUGIN}/views?run={run}")
    views = ["Trace", *[v for v in views if v != "Trace"]]  # the page opens the first view
    served = {f"{PLUGIN}/views": (json.dumps(views).encode(), "application/json")}
    if polyfill is not None:
        served["webcomponents.min.js"] = (polyfill.read_bytes(), "text/javascript")
        served["charts/loader.js"] = (CHARTS_STUB, "text/javascript")
    flags = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={size[0]},{size[1]}",
    ]
    browser = DevTools(chromium, flags)
    try:
        page = next(t for t in browser.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = browser.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]

        delivered: list[dict] = []

        def on_event(event: dict) -> None:
            if event["method"] == "Runtime.consoleAPICalled":  # the trace view logs the trace it was sent
                preview = event["params"]["args"][0].get("preview", {}).get("properties", [])
                delivered.extend(p for p in preview if p["name"] == "msg" and p.get("value") == "data")
                return
            if event["method"] != "Fetch.requestPaused":
                return
            request = event["params"]
            url = request["request"]["url"].split("?")[0]
            for suffix, (body, kind) in served.items():
                if url.endswith(suffix):
                    fulfil = {
                        "requestId": request["requestId"],
                        "responseCode": 200,
                        "responseHeaders": [{"name": "Content-Type", "value": kind}],
                        "body": base64.b64encode(body).decode(),
                    }
                    browser.call("Fetch.fulfillRequest", fulfil, session)
                    return
            browser.call("Fetch.continueRequest", {"requestId": request["requestId"]}, session)

        browser.on_event = on_event
        patterns = [{"urlPattern": f"*{suffix}*"} for suffix in served]
        browser.call("Fetch.enable", {"patterns": patterns}, session)
        metrics = {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}
        browser.call("Emulation.setDeviceMetricsOverride", metrics, session)
        browser.call("Page.enable", {}, session)
        browser.call("Runtime.enable", {}, session)
        browser.call("Page.navigate", {"url": f"{base}/#pytorch_profiler"}, session)
        deadline = time.monotonic() + 120
        while not delivered:
            browser.pump(1.0)
            if time.monotonic() > deadline:
                raise TimeoutError("the Trace view received no trace within 120 s")
        browser.pump(settle)  # the trace viewer imports the trace and draws the timeline
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "images" / "profiler-tensorboard.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--settle", type=float, default=15.0, help="seconds left to the trace viewer to draw")
    parser.add_argument("--size", default="1400,700", help="the window size, width,height")
    parser.add_argument(
        "--offline", type=Path, metavar="POLYFILL", help="serve this webcomponents.min.js 0.7.24 (no internet)"
    )
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no Chromium found: install it (apt-get install chromium) or pass --chromium")
    width, height = (int(n) for n in args.size.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp) / "tb"
        traces = make_traces(logdir)
        print("traces:", *traces, sep="\n  ")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]
            + ["--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            run = wait_for_run(base)
            print(f"TensorBoard on port {port}, run {run!r}")
            screenshot(args.chromium, base, run, args.out, (width, height), args.offline, args.settle)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
