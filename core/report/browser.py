"""Open an HTML page in headless Chromium and report what a reader would see: sections, decoded images, console errors.

Driven through ``chromedriver``'s W3C WebDriver HTTP API with the standard library alone (no Selenium): start the
driver on a free local port, open a session with headless Chromium, load the page, run one script that lists the
sections and every image's decoded size, read the browser console log, and save a screenshot of the whole page.
Debian packages: ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them).

Example::

    from core.report.browser import find_chromium, inspect_page
    found = find_chromium()            # None when Chromium or chromedriver is missing
    view = inspect_page("demo_out/index.html", "shot.png", *found)
    view.problems(["pretraining", "canopy"], min_images=6)   # [] when the page reads well
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "chromium-driver")
_LIBEXEC = ("/usr/lib/chromium/chromium", "/usr/lib/chromium/chromedriver")

# Runs in the page once it has loaded: what a reader gets (every <img> decoded, every section with a heading).
_PROBE = """
const images = Array.from(document.images).map((img, i) => ({
  index: i, alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
  data_uri: img.src.startsWith('data:')}));
const sections = Array.from(document.querySelectorAll('section[id]')).map(s => ({
  id: s.id, title: (s.querySelector('h2') || {}).textContent || ''}));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'));
return {title: document.title, images: images, sections: sections, links: links,
        height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)};
"""


@dataclass
class PageView:
    """What headless Chromium made of a page."""

    title: str
    sections: list[dict[str, str]]
    images: list[dict[str, Any]]
    links: list[str]
    console: list[dict[str, Any]]
    screenshot: Path | None
    height: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        """Images that did not decode (not complete, or natural width 0)."""
        return [i for i in self.images if not i["complete"] or i["width"] <= 0]

    @property
    def console_errors(self) -> list[dict[str, Any]]:
        """Console entries at level SEVERE (errors, failed loads, uncaught exceptions)."""
        return [e for e in self.console if str(e.get("level", "")).upper() == "SEVERE"]

    def problems(self, sections: Sequence[str] = (), min_images: int = 0) -> list[str]:
        """What a reader would miss: absent sections, too few or undecoded images, console errors, an unread log."""
        found = {s["id"] for s in self.sections}
        issues = [f"section {name!r} is missing" for name in sections if name not in found]
        if len(self.images) < min_images:
            issues.append(f"{len(self.images)} images, expected at least {min_images}")
        issues += [f"image {i['index']} ({i['alt']!r}) did not decode" for i in self.broken_images]
        issues += [f"console: {e.get('message')}" for e in self.console_errors]
        return issues + self.notes


def find_chromium() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` binaries from ``PATH`` (or Debian's locations); None if either is missing."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    browser = browser or (_LIBEXEC[0] if os.access(_LIBEXEC[0], os.X_OK) else None)
    driver = driver or (_LIBEXEC[1] if os.access(_LIBEXEC[1], os.X_OK) else None)
    return (browser, driver) if browser and driver else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _WebDriver:
    """The few WebDriver endpoints we use, over ``urllib``."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = ""

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        url = f"{self.base}/session/{self.session}{path}" if self.session else f"{self.base}{path}"
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}").get("value")
        except urllib.error.HTTPError as err:
            detail = json.loads(err.read() or b"{}").get("value", {})
            raise RuntimeError(f"WebDriver {method} {path}: {detail.get('message', err)}") from None

    def wait_ready(self, deadline_s: float) -> None:
        stop = time.monotonic() + deadline_s
        while True:
            try:
                if (self.call("GET", "/status", timeout=2.0) or {}).get("ready"):
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > stop:
                raise RuntimeError(f"chromedriver did not become ready within {deadline_s:.0f} s")
            time.sleep(0.1)


def inspect_page(
    page: str | os.PathLike,
    screenshot: str | os.PathLike | None,
    browser: str,
    driver: str,
    *,
    width: int = 1280,
    max_height: int = 12000,
    timeout_s: float = 60.0,
) -> PageView:
    """Load ``page`` (a local file) in headless Chromium; return a :class:`PageView` and save a full-page PNG."""
    port = _free_port()
    process = subprocess.Popen(
        [driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wd = _WebDriver(port)
    try:
        wd.wait_ready(timeout_s)
        options = {
            "binary": browser,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--window-size={width},900",
                "--hide-scrollbars",
            ],
        }
        capabilities = {"browserName": "chrome", "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}
        created = wd.call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}}, timeout=timeout_s)
        wd.session = created["sessionId"]
        try:
            wd.call("POST", "/url", {"url": Path(page).resolve().as_uri()}, timeout=timeout_s)
            probe = wd.call("POST", "/execute/sync", {"script": _PROBE, "args": []})
            console, notes = _console_log(wd)
            shot = None
            if screenshot is not None:
                height = min(max(int(probe["height"]), 600), max_height)
                wd.call("POST", "/window/rect", {"width": width, "height": height})
                shot = Path(screenshot)
                shot.parent.mkdir(parents=True, exist_ok=True)
                shot.write_bytes(base64.b64decode(wd.call("GET", "/screenshot")))
            return PageView(
                title=probe["title"],
                sections=probe["sections"],
                images=probe["images"],
                links=probe["links"],
                console=console,
                screenshot=shot,
                height=int(probe["height"]),
                notes=notes,
            )
        finally:
            wd.call("DELETE", "")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _console_log(wd: _WebDriver) -> tuple[list[dict[str, Any]], list[str]]:
    """The browser console (chromedriver's log endpoint; its path differs between driver versions)."""
    for path in ("/se/log", "/log"):
        try:
            return list(wd.call("POST", path, {"type": "browser"}) or []), []
        except RuntimeError as err:
            last = str(err)
    return [], [f"console log unavailable: {last}"]
