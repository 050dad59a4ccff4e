"""The built book as a reader sees it: every page opened in headless Chromium at 1280 px.

Uses Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``)
driven by Selenium; nothing is downloaded at run time (the driver path is given, so Selenium
Manager is never asked for one). The pages are served from ``127.0.0.1`` as a web server would
serve them. For each page it records:

* elements of the main text column that stick out of it, outside a horizontal scroll container
  (a table or figure cut off at the column's edge);
* images that did not load (natural width 0);
* errors on the browser console (failed loads, script errors; not the browser's own request for
  ``/favicon.ico`` at the server root, which the book does not make);
* raw maths left in the text (``\\(``, ``\\[``, ``$$`` or a TeX command outside code) and MathJax
  errors;
* absolute paths of the machine that built the book;
* table cells of the form ``mean ± sd`` that wrap over more than one line;
* containers that scroll sideways without a visible scrollbar;
* tables that need a horizontal scrollbar (allowed, but reported);
* slice viewers (``[data-mmdm-viewer]``) whose panels do not all change when the slice slider moves,
  or when the slab-MIP toggle is switched on;

and saves a full-page screenshot. Run it on a built book:

    .venv/bin/python tests/book_browser.py _build/html [--shots DIR]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Sequence

WIDTH = 1280
HEIGHT = 900
#: longest full-page screenshot (px); longer pages are cut there
MAX_SHOT_HEIGHT = 20000
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver")
#: build output that is not a page of the book
NOT_PAGES = ("_static", "_sources", "_images", "_sphinx_design_static", "_panels_static")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables from the OS packages, or None where either is missing."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    return (browser, driver) if browser and driver else None


def is_redirect(page: Path) -> bool:
    """A page that only forwards the reader (the book's root ``index.html``: a meta refresh to the first
    page). Inspecting it races with the navigation it starts, and the page it forwards to is checked."""
    head = page.read_text(errors="replace")[:2000].lower()
    return 'http-equiv="refresh"' in head and "<article" not in head


def book_pages(html_dir: Path) -> list[Path]:
    """Every HTML page of a built book (not the copies of its sources or static files)."""
    pages = [p for p in sorted(html_dir.rglob("*.html"))
             if not set(p.relative_to(html_dir).parts[:-1]) & set(NOT_PAGES) and not is_redirect(p)]
    if not pages:
        raise FileNotFoundError(f"{html_dir}: no HTML page; build the book first (make book)")
    return pages


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on a free port of 127.0.0.1 for the duration of the block; yields its URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class PageReport:
    page: str
    overflow: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    raw_math: list[str] = field(default_factory=list)
    math_errors: int = 0
    absolute_paths: list[str] = field(default_factory=list)
    wrapped_cells: list[str] = field(default_factory=list)
    scrolled_tables: list[str] = field(default_factory=list)
    hidden_scrollbars: list[str] = field(default_factory=list)
    viewer_problems: list[str] = field(default_factory=list)
    n_viewers: int = 0
    n_images: int = 0
    n_math: int = 0
    column_width: float = 0.0
    viewport_width: int = 0
    screenshot: Path | None = None

    def problems(self) -> list[str]:
        out = [f"{self.page}: overflows the text column: {e}" for e in self.overflow]
        out += [f"{self.page}: image not loaded: {e}" for e in self.broken_images]
        out += [f"{self.page}: console error: {e}" for e in self.console_errors]
        out += [f"{self.page}: raw maths in the text: {e!r}" for e in self.raw_math]
        out += [f"{self.page}: {self.math_errors} MathJax error(s)"] if self.math_errors else []
        out += [f"{self.page}: absolute path of the building machine: {e}" for e in self.absolute_paths]
        out += [f"{self.page}: 'mean ± sd' cell wraps: {e!r}" for e in self.wrapped_cells]
        out += [f"{self.page}: scrolls sideways without a visible scrollbar: {e}" for e in self.hidden_scrollbars]
        out += [f"{self.page}: slice viewer: {e}" for e in self.viewer_problems]
        return out


# In the page: the main text column, and what of it a reader would see as broken.
_INSPECT = r"""
const col = document.querySelector('article.bd-article') || document.querySelector('[role=main]') || document.body;
const c = col.getBoundingClientRect();
const describe = el => {
  const id = el.id ? '#' + el.id : '';
  const cls = el.classList.length ? '.' + [...el.classList].slice(0, 3).join('.') : '';
  const text = (el.innerText || el.getAttribute('alt') || '').trim().replace(/\s+/g, ' ').slice(0, 60);
  return `<${el.tagName.toLowerCase()}${id}${cls}> "${text}"`;
};
const scrolls = el => { const s = getComputedStyle(el); return s.overflowX === 'auto' || s.overflowX === 'scroll'; };
const inScroller = el => {
  for (let a = el.parentElement; a && a !== col.parentElement; a = a.parentElement) {
    if (scrolls(a) && a.getBoundingClientRect().right <= c.right + 1) return true;
  }
  return false;
};
const overflow = [];
for (const el of col.querySelectorAll('*')) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 || r.height === 0) continue;
  const s = getComputedStyle(el);
  if (s.visibility === 'hidden' || s.display === 'none' || s.position === 'fixed') continue;
  if ((r.right > c.right + 1 || r.left < c.left - 1) && !inScroller(el)) {
    // report the outermost offender only
    const p = el.parentElement;
    const pr = p ? p.getBoundingClientRect() : null;
    if (!pr || !(pr.right > c.right + 1 || pr.left < c.left - 1) || p === col) overflow.push(describe(el) + ` right=${Math.round(r.right)} > ${Math.round(c.right)}`);
  }
}
const images = [...document.images];
const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
const clone = col.cloneNode(true);
clone.querySelectorAll('pre, code, script, style, mjx-container, mjx-assistive-mml, .MathJax').forEach(e => e.remove());
const text = clone.textContent;
const rawMath = [];
for (const re of [/\\[()\[\]]/g, /\$\$/g, /\\[A-Za-z]{2,}/g]) {
  for (const m of text.matchAll(re)) rawMath.push(text.slice(Math.max(0, m.index - 30), m.index + 30));
}
const wrapped = [];
for (const td of col.querySelectorAll('td, th')) {
  const t = td.innerText.trim();
  if (!/^[-−]?[\d.]+\s*±\s*[\d.]+$/.test(t)) continue;
  const range = document.createRange();
  range.selectNodeContents(td);
  const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
  if (tops.size > 1) wrapped.push(t);
}
const scrolled = [...col.querySelectorAll('table')].filter(t => {
  for (let a = t.parentElement; a && a !== col; a = a.parentElement) if (scrolls(a) && a.scrollWidth > a.clientWidth + 1) return true;
  return false;
}).map(t => (t.querySelector('th, td') ? t.innerText.trim().replace(/\s+/g, ' ').slice(0, 80) : ''));
// a container that scrolls sideways must show its scrollbar (the reader must see there is more)
const hiddenBars = [...col.querySelectorAll('*')].filter(e => scrolls(e) && e.scrollWidth > e.clientWidth + 1)
  .filter(e => { const s = getComputedStyle(e);
                 return e.offsetHeight - e.clientHeight - parseFloat(s.borderTopWidth) - parseFloat(s.borderBottomWidth) < 1; })
  .map(describe);
return {overflow, broken, rawMath, wrapped, scrolled, hiddenBars,
        mathErrors: document.querySelectorAll('mjx-merror, .MathJax_Error').length,
        nMath: document.querySelectorAll('mjx-container').length,
        nImages: images.length, columnWidth: c.width, viewport: window.innerWidth,
        text: document.body.innerText, height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)};
"""

# Wait (up to the script timeout) until MathJax has typeset the page, where the page has maths.
# Until the document has loaded and has a body (a busy machine may run a script before that).
_WAIT_READY = r"""
const done = arguments[arguments.length - 1];
const t0 = Date.now();
(function poll() {
  if (document.readyState === 'complete' && document.body) done(true);
  else if (Date.now() - t0 > 20000) done(false);
  else setTimeout(poll, 50);
})();
"""

_WAIT_MATH = r"""
const done = arguments[arguments.length - 1];
const hasMath = document.querySelector('.math, span.math, div.math') !== null;
if (!hasMath) { done('none'); return; }
const t0 = Date.now();
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done('typeset'), e => done('error: ' + e));
  } else if (Date.now() - t0 > 15000) { done('no MathJax'); }
  else setTimeout(poll, 100);
})();
"""


# Every slice viewer of the page: wait until its volumes are decoded, then move its slider and switch on the
# slab MIP, and report each panel that was not redrawn at the new slab (the slab a canvas shows, its
# ``data-drawn``) and each viewer where no panel's pixels changed. A panel whose own slices are alike (an
# untrained model's flat output) may keep its pixels; it must still follow the slider.
_VIEWERS = r'''
const done = arguments[arguments.length - 1];
const viewers = [...document.querySelectorAll('[data-mmdm-viewer]')];
const t0 = Date.now();
(function poll() {
  if (viewers.some(v => v.dataset.ready !== '1')) {
    if (Date.now() - t0 > 20000) {
      done({n: viewers.length, problems: viewers.filter(v => v.dataset.ready !== '1')
            .map(v => v.dataset.mmdmViewer + ': volumes never decoded')});
      return;
    }
    setTimeout(poll, 100);
    return;
  }
  const problems = [];
  const snap = v => [...v.querySelectorAll('canvas.mmdm-viewer-panel')].map(c => [c.dataset.drawn, c.toDataURL()]);
  const fire = (el, type) => el.dispatchEvent(new Event(type, {bubbles: true}));
  const compare = (name, labels, a, b, what) => {
    b.forEach((s, i) => { if (s[0] === a[i][0]) problems.push(name + ': panel "' + labels[i] + '" did not follow ' + what); });
    if (b.every((s, i) => s[1] === a[i][1])) problems.push(name + ': no panel changed with ' + what);
  };
  for (const v of viewers) {
    const name = v.dataset.mmdmViewer, slider = v.querySelector('.mmdm-viewer-slice');
    const labels = [...v.querySelectorAll('figcaption')].map(f => f.textContent);
    const before = snap(v);
    if (before.length < 2) problems.push(name + ': fewer than two panels');
    slider.value = String(Math.max(0, Math.floor((+slider.max) / 4)));
    fire(slider, 'input');
    const moved = snap(v);
    compare(name, labels, before, moved, 'the slider');
    const mip = v.querySelector('.mmdm-viewer-mip');
    mip.checked = true;
    fire(mip, 'change');
    compare(name, labels, moved, snap(v), 'the slab MIP');
    mip.checked = false;
    fire(mip, 'change');
  }
  done({n: viewers.length, problems});
})();
'''


def check_viewers(drv) -> tuple[int, list[str]]:
    """(number of slice viewers on the open page, problems of their panels)."""
    res = drv.execute_async_script(_VIEWERS)
    return int(res["n"]), list(res["problems"])


def _driver(browser: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", f"--window-size={WIDTH},{HEIGHT}", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def check_book(html_dir: str | Path, forbidden: Sequence[str], shots: str | Path | None = None,
               pages: Sequence[Path] | None = None) -> list[PageReport]:
    """Open every page of the book built in ``html_dir`` in headless Chromium at 1280 px.

    ``forbidden``: strings that must not appear in a page (absolute paths of the building machine).
    ``shots``: folder for one full-page PNG per page (default ``html_dir/../browser-check``)."""
    import base64

    html_dir = Path(html_dir).resolve()
    found = find_chromium()
    if found is None:
        raise RuntimeError("headless Chromium not found: install Debian's `chromium` and `chromium-driver` "
                           "(apt-get install chromium chromium-driver)")
    shots = Path(shots) if shots else html_dir.parent / "browser-check"
    shots.mkdir(parents=True, exist_ok=True)
    forbidden = [f for f in forbidden if f and f != "/"]
    reports = []
    with serve(html_dir) as url:
        drv = _driver(*found)
        try:
            # headless Chromium hides scrollbars; a reader's browser shows them (and the book styles them)
            drv.execute_cdp_cmd("Emulation.setScrollbarsHidden", {"hidden": False})
            drv.set_script_timeout(30)
            drv.set_page_load_timeout(60)
            for page in pages or book_pages(html_dir):
                rel = page.relative_to(html_dir).as_posix()
                drv.get(f"{url}/{rel}")
                if not drv.execute_async_script(_WAIT_READY):
                    raise RuntimeError(f"{rel}: the page did not finish loading within 20 s")
                drv.execute_async_script(_WAIT_MATH)
                res = drv.execute_script(_INSPECT)
                n_viewers, viewer_problems = check_viewers(drv)
                logs = drv.get_log("browser")
                src = drv.page_source
                rep = PageReport(
                    page=rel, overflow=res["overflow"], broken_images=res["broken"], raw_math=res["rawMath"],
                    wrapped_cells=res["wrapped"], scrolled_tables=res["scrolled"], hidden_scrollbars=res["hiddenBars"],
                    math_errors=res["mathErrors"], n_viewers=n_viewers, viewer_problems=viewer_problems,
                    n_images=res["nImages"], n_math=res["nMath"], column_width=res["columnWidth"],
                    viewport_width=res["viewport"],
                    console_errors=[e["message"] for e in logs if e.get("level") == "SEVERE"
                                    and "/favicon.ico " not in e["message"]],
                    absolute_paths=sorted({f for f in forbidden if f in res["text"] or f in src}))
                # the whole page: the viewport made as tall as the page for the capture, then restored
                height = min(int(res["height"]), MAX_SHOT_HEIGHT)
                drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})
                try:
                    shot = drv.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
                finally:
                    drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
                rep.screenshot = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
                rep.screenshot.write_bytes(base64.b64decode(shot["data"]))
                reports.append(rep)
        finally:
            drv.quit()
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default="_build/html", help="the built book (default: _build/html)")
    ap.add_argument("--shots", default=None, help="screenshot folder (default: HTML/../browser-check)")
    ap.add_argument("--forbid", nargs="*", default=None,
                    help="strings no page may contain (default: the repository root and the home folder)")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    forbidden = args.forbid if args.forbid is not None else [str(root), str(Path.home()) + "/"]
    reports = check_book(args.html, forbidden, args.shots)
    problems = [p for r in reports for p in r.problems()]
    for r in reports:
        extra = f"; scrolled tables: {len(r.scrolled_tables)}" if r.scrolled_tables else ""
        extra += f"; slice viewers: {r.n_viewers}" if r.n_viewers else ""
        print(f"{r.page}: {r.n_images} images, {r.n_math} maths, column {r.column_width:.0f} px{extra} -> {r.screenshot}")
    print("\n".join(problems) or f"{len(reports)} pages, no problem")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
