"""Open the built documentation site in headless Chromium and check that it renders.

Usage (after ``sphinx-build -W -b html docs docs/_build/html``)::

    python docs/check_site.py [--site docs/_build/html] [--chromium /usr/bin/chromium]

Serves the site on localhost, loads the index, one guide, one tutorial and the API page of
``bptt_jax.unroll``, and fails on a page that does not load, has no heading or body text,
shows an unrendered MyST/RST fragment, or logs a JavaScript error; then checks that the
search page finds ``unroll``. Screenshots of every page go to ``<site>/../screenshots/``.
Exit status 0 when every check passes, 1 otherwise (each failure printed on one line).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import threading
from pathlib import Path

PAGES = {
    "index": "index.html",
    "guide": "guides/schedules.html",
    "tutorial": "tutorials/digits.html",
    "api-unroll": "api/generated/bptt_jax.unroll.html",
}
# What a page must show: its heading (a substring of the <h1>'s text).
HEADINGS = {"index": "bptt_jax", "api-unroll": "unroll"}
# Chromium's flags for a closed network, as root, without a screen.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _check_page(page, url: str, name: str, shots: Path) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"{name}: JavaScript error: {e}"))
    page.on(
        "console",
        lambda m: (
            errors.append(f"{name}: console {m.type}: {m.text}") if m.type == "error" else None
        ),
    )
    response = page.goto(url, wait_until="networkidle")
    if response is None or response.status != 200:
        status = None if response is None else response.status
        return [f"{name}: {url} did not load (HTTP status {status})"]
    h1 = page.locator("main h1, article h1").first
    heading = h1.inner_text() if h1.count() else ""
    text = page.locator("main, article").first.inner_text()
    if not heading.strip():
        errors.append(f"{name}: no <h1> heading rendered")
    want = HEADINGS.get(name)
    if want and want not in heading:
        errors.append(f"{name}: heading {heading!r} does not name {want!r}")
    if len(text) < 200:
        errors.append(f"{name}: only {len(text)} characters of body text")
    for fragment in ("```", "{code-cell}", "{eval-rst}", ":func:`", "{toctree}"):
        if fragment in text:
            errors.append(f"{name}: unrendered markup {fragment!r} in the page")
    page.screenshot(path=str(shots / f"{name}.png"), full_page=False)
    return errors


def _check_search(page, base: str, shots: Path) -> list[str]:
    page.goto(f"{base}/search.html?q=unroll", wait_until="networkidle")
    results = page.locator("#search-results ul.search li, ul.search li")
    try:
        results.first.wait_for(timeout=20_000)
    except Exception:  # a timeout: the search found nothing
        return ["search: no result for 'unroll'"]
    found = [results.nth(i).inner_text() for i in range(results.count())]
    page.screenshot(path=str(shots / "search.png"))
    if not any("unroll" in f for f in found):
        return [f"search: results for 'unroll' do not name it: {found[:5]}"]
    return []


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=here / "_build" / "html")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"check_site: no built site at {args.site} (run sphinx-build first)")
        return 1
    if not Path(args.chromium).is_file():
        print(f"check_site: no Chromium at {args.chromium} (Debian: apt-get install chromium)")
        return 1
    from playwright.sync_api import sync_playwright

    shots = args.site.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    server, base = _serve(args.site)
    failures: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            for name, path in PAGES.items():
                if not (args.site / path).is_file():
                    failures.append(f"{name}: {path} is not in the built site")
                    continue
                failures += _check_page(context.new_page(), f"{base}/{path}", name, shots)
            failures += _check_search(context.new_page(), base, shots)
            browser.close()
    finally:
        server.shutdown()
    for failure in failures:
        print(f"check_site: FAIL {failure}")
    if not failures:
        pages = ", ".join(PAGES)
        print(f"check_site: ok ({pages}, search); screenshots in {shots}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
