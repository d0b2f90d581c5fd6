"""A real browser clicks through the sign-in: headless Chromium, driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` packages are used, never a downloaded
browser: when they are missing and we run as root with apt, the test installs them
(once, generously timed). It is skipped, with the reason shown, only where no browser
can be installed. Selenium itself is installed into this interpreter if missing.

The page is checked the way a person would use it: providers listed, the provider's
sign-in form, the roles page, the credentials page with its copy buttons and countdown
(so the script ran under the strict CSP), and sign-out.

Every page of ours (sign-in, roles, role choice, credentials, the HTML 404, a refused
person's roles page) is also
checked at a phone width (360 px, emulated as a mobile device) and at a desktop width
(1280 px): a full-page screenshot of each under ``tests/artifacts/`` (``NAME-360.png``,
``NAME-1280.png``), nothing wider than the viewport (the document's scrollWidth and
every element outside a horizontally scrolling box), and an axe-core accessibility run
with no serious or critical violation. axe-core comes from the npm registry, pinned
(``AXE_VERSION``), installed once with ``npm install`` into a cache directory
(``$XDG_CACHE_HOME/broker-tests``) and injected with Selenium's ``execute_script``, which
the page's CSP does not govern, so the CSP stays as strict as in production.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from broker.devstack.oidc_server import DEMO_USERS
from broker.devstack.packages import apt_install
from broker.devstack.stack import ADMIN_ROLE
from tests.conftest import LiveBroker

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
APT_TIMEOUT_SECONDS = 1200
PIP_TIMEOUT_SECONDS = 300
WAIT_SECONDS = 20

# axe-core, pinned: a new release may add rules, and that should be a deliberate bump.
AXE_VERSION = "4.14.1"
NPM_TIMEOUT_SECONDS = 300
# The widths every page must work at: a small phone, and a desktop.
WIDTHS = (360, 1280)
SERIOUS = ("serious", "critical")

BROWSER_NAMES = ("chromium", "chromium-browser")
DRIVER_NAMES = ("chromedriver",)
DRIVER_PATHS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container: the setuid sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1500",
    # Hermetic: nothing but the local servers resolves (the provider mock's page links a
    # CDN stylesheet, which then fails at once instead of hanging the page load).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def _which(names: tuple[str, ...], paths: tuple[str, ...] = ()) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in paths if Path(p).is_file()), None)


def _installed() -> tuple[str, str] | None:
    browser = _which(BROWSER_NAMES)
    driver = _which(DRIVER_NAMES, DRIVER_PATHS)
    return (browser, driver) if browser and driver else None


def _apt_install(*packages: str) -> str | None:
    """Install Debian packages (chromium + chromium-driver by default); the reason it
    failed, or None."""
    return apt_install(*(packages or ("chromium", "chromium-driver")), timeout=APT_TIMEOUT_SECONDS)


def _ensure_selenium() -> None:
    try:
        importlib.import_module("selenium.webdriver")
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "selenium>=4.20"],
            check=True,
            timeout=PIP_TIMEOUT_SECONDS,
        )
        importlib.invalidate_caches()


@pytest.fixture(scope="session")
def axe_source() -> str:
    """axe-core's browser bundle, from the npm registry (pinned), cached between runs."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "broker-tests"
    prefix = cache / f"axe-core-{AXE_VERSION}"
    bundle = prefix / "node_modules" / "axe-core" / "axe.min.js"
    if not bundle.is_file():
        if not shutil.which("npm"):
            reason = _apt_install("npm")
            if not shutil.which("npm"):
                # No skip: without axe the accessibility promise would go unchecked.
                pytest.fail(f"npm is needed for the axe-core check: {reason}")
        done = subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(prefix),
                "--no-audit",
                "--no-fund",
                "--save-exact",
                f"axe-core@{AXE_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_SECONDS,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    return bundle.read_text()


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    found = _installed()
    if found is None:
        reason = _apt_install()
        found = _installed()
        if found is None:
            pytest.skip(f"no browser available: {reason or 'chromium still not found'}")
    _ensure_selenium()
    return found


@pytest.fixture
def driver(
    chromium: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Belt and braces: Selenium Manager must never try to fetch a browser or driver.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    browser_path, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    options.page_load_strategy = "eager"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    drv = webdriver.Chrome(options=options, service=service)
    drv.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield drv
    finally:
        drv.quit()


# Elements wider than the viewport, outside any box that scrolls or clips horizontally
# (a <pre> that scrolls its own content is fine; the page scrolling sideways is not).
OVERFLOW_SCRIPT = """
const width = window.innerWidth;
const bad = [];
for (const el of document.body.querySelectorAll("*")) {
  const box = el.getBoundingClientRect();
  if (box.width === 0 && box.height === 0) continue;
  let inside = false;
  for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
    if (["auto", "scroll", "hidden", "clip"].includes(getComputedStyle(p).overflowX)) {
      inside = true;
      break;
    }
  }
  if (inside) continue;
  if (box.right > width + 0.5 || box.left < -0.5) {
    bad.push(el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
             (el.className ? "." + String(el.className).replace(/ /g, ".") : "") +
             " [" + Math.round(box.left) + ", " + Math.round(box.right) + "]");
  }
}
return {scrollWidth: document.documentElement.scrollWidth, innerWidth: width, bad: bad};
"""

AXE_SCRIPT = """
const done = arguments[arguments.length - 1];
axe.run(document, {resultTypes: ["violations"]}).then(
  (r) => done(r.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.map((n) => n.target.join(" ")).slice(0, 5),
  }))),
  (e) => done([{id: "axe-error", impact: "critical", help: String(e), nodes: []}]),
);
"""


def _set_width(driver: Any, width: int) -> None:
    phone = width < 600
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": phone},
    )


def _full_page_screenshot(driver: Any, path: Path) -> None:
    import base64

    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(driver: Any, name: str, axe_source: str) -> None:
    """The page as it is now, at each width: screenshot, no overflow, no serious axe
    violation. Ends at the desktop width."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        _set_width(driver, width)
        layout = driver.execute_script(OVERFLOW_SCRIPT)
        assert layout["innerWidth"] == width, layout
        assert layout["scrollWidth"] <= layout["innerWidth"], (name, width, layout)
        assert layout["bad"] == [], (name, width, layout["bad"])
        shot = ARTIFACTS / f"{name}-{width}.png"
        _full_page_screenshot(driver, shot)
        assert shot.stat().st_size > 5_000
        driver.execute_script(axe_source)
        violations = driver.execute_async_script(AXE_SCRIPT)
        serious = [v for v in violations if v["impact"] in SERIOUS]
        assert serious == [], (name, width, serious)
    # The same page in dark mode, at the desktop width: readable (axe's contrast rules).
    dark = {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", dark)
    try:
        _full_page_screenshot(driver, ARTIFACTS / f"{name}-dark.png")
        driver.execute_script(axe_source)
        violations = driver.execute_async_script(AXE_SCRIPT)
        serious = [v for v in violations if v["impact"] in SERIOUS]
        assert serious == [], (name, "dark", serious)
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _demo(name: str) -> str:
    return next(str(u["sub"]) for u in DEMO_USERS if str(u["sub"]).split("@")[0] == name)


def _alice() -> str:
    return _demo("alice")


def _sign_in_at_provider(driver: Any, sub: str) -> None:
    """Pick ``sub`` on the local OIDC provider's sign-in page."""
    from selenium.webdriver.common.by import By

    buttons = driver.find_elements(By.CSS_SELECTOR, f'button[name="sub"][value="{sub}"]')
    if buttons:
        buttons[0].click()
    else:
        field = driver.find_element(By.CSS_SELECTOR, 'input[name="sub"]')
        field.send_keys(sub)
        field.submit()


def test_sign_in_to_credentials_in_chromium(
    driver: Any, broker: LiveBroker, axe_source: str
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT_SECONDS)

    # 0. A page that does not exist is an HTML page for a browser.
    driver.get(f"{broker.url}/no/such/page")
    assert driver.find_element(By.ID, "error-code").text == "not_found"
    check_page(driver, "not-found", axe_source)

    # A refusal page: what happened as its heading, and the next step that fits.
    driver.get(f"{broker.url}/login/gogle")
    assert driver.find_element(By.ID, "error-code").text == "unknown_provider"
    assert driver.find_element(By.TAG_NAME, "h1").text == "Unknown sign-in provider"
    message = driver.find_element(By.ID, "error-message").text
    assert message[:1].isupper(), message
    check_page(driver, "error-unknown-provider", axe_source)

    # 1. The broker's sign-in page lists the provider.
    driver.get(f"{broker.url}/login")
    assert driver.title.startswith("Sign in")
    check_page(driver, "login-page", axe_source)
    driver.find_element(By.ID, "provider-demo").click()

    # 2. The local provider's sign-in form: sign in as alice.
    wait.until(ec.url_contains(broker.stack.oidc.url))
    sub = _alice()
    _sign_in_at_provider(driver, sub)

    # 3. Back at the broker, signed in: who we are and the roles.
    wait.until(ec.url_to_be(f"{broker.url}/"))
    assert driver.find_element(By.ID, "subject").text == sub
    role_buttons = driver.find_elements(By.NAME, "get-credentials")
    assert len(role_buttons) == 2
    check_page(driver, "home-page", axe_source)
    # The first role row is the admin role (rule order).
    assert ADMIN_ROLE in driver.find_element(By.CSS_SELECTOR, "code.role").text

    # The role picker, then back home to pick with a button.
    driver.get(f"{broker.url}/credentials")
    wait.until(ec.presence_of_element_located((By.ID, "role_arn")))
    check_page(driver, "choose-role", axe_source)
    driver.get(f"{broker.url}/")
    role_buttons = wait.until(lambda d: d.find_elements(By.NAME, "get-credentials"))
    role_buttons[0].click()

    # 4. The credentials page: keys, snippets, a running countdown (our script ran).
    access_key = wait.until(ec.presence_of_element_located((By.ID, "access-key-id"))).text
    assert access_key.startswith(("ASIA", "AKIA"))
    assert f"export AWS_ACCESS_KEY_ID={access_key}" in driver.find_element(By.ID, "snippet-sh").text
    wait.until(lambda d: "left" in d.find_element(By.ID, "countdown").text)
    # The ticking text is not a live region; the polite status is another element.
    assert driver.find_element(By.ID, "countdown").get_attribute("aria-live") == "off"
    assert driver.find_element(By.ID, "countdown-status").get_attribute("role") == "status"
    # The expiry shows its time zone (toLocaleString with timeStyle "long").
    expires = driver.find_element(By.ID, "expiration").text
    assert any(zone in expires for zone in ("UTC", "GMT")), expires
    # Seven copy buttons (three keys, four snippets), each with its own accessible name.
    labels = [
        b.get_attribute("aria-label") for b in driver.find_elements(By.CSS_SELECTOR, "button.copy")
    ]
    assert len(labels) == len(set(labels)) == 7, labels
    assert "broker configure" in driver.find_element(By.ID, "snippet-cli").text
    assert "Copy access key id" in labels
    check_page(driver, "credentials-page", axe_source)

    # The copy button puts the key on the clipboard.
    driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {
            "origin": broker.url,
            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
        },
    )
    copy = driver.find_element(By.CSS_SELECTOR, 'button[data-copy="access-key-id"]')
    copy.click()
    wait.until(lambda _driver: "Copied" in copy.text)
    pasted = driver.execute_async_script(
        "const done = arguments[0];"
        "navigator.clipboard.readText().then(done, (e) => done('error: ' + e));"
    )
    assert pasted == access_key

    screenshot = ARTIFACTS / "credentials-page.png"
    assert driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000

    # 5. Back home, "Open the AWS console" for the admin role lands, through the
    # broker's 303, on the (local) federation endpoint signed in as that role.
    driver.get(f"{broker.url}/")
    console_buttons = driver.find_elements(
        By.XPATH, '//button[normalize-space()="Open the AWS console"]'
    )
    assert len(console_buttons) == 2
    console_buttons[0].click()
    wait.until(ec.url_contains(broker.stack.federation.url))
    assert "Action=login" in driver.current_url
    caller = wait.until(ec.presence_of_element_located((By.ID, "caller"))).text
    assert "assumed-role/BrokerDemoAdmin/" in caller
    driver.save_screenshot(str(ARTIFACTS / "console-signin.png"))

    # The CLI sign-in pages (broker login): the loopback approval and the device code.
    # Approve must reach the CLI's loopback listener: Chromium applies the page's CSP
    # form-action to the redirect that answers the form.
    arrived: list[str] = []

    class Listener(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            arrived.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_args: object, **_kwargs: object) -> None:
            return

    listener = HTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=listener.handle_request, daemon=True).start()
    redirect_uri = quote(f"http://127.0.0.1:{listener.server_address[1]}/callback", safe="")
    challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    driver.get(
        f"{broker.url}/cli/authorize?redirect_uri={redirect_uri}"
        f"&code_challenge={challenge}&code_challenge_method=S256&state=browser-test"
    )
    assert driver.find_element(By.ID, "approve").text == "Approve"
    check_page(driver, "cli-authorize", axe_source)
    driver.find_element(By.ID, "approve").click()
    wait.until(lambda _d: arrived)
    listener.server_close()
    assert arrived[0].startswith("/callback?code=")
    assert "state=browser-test" in arrived[0]
    driver.get(f"{broker.url}/device")
    check_page(driver, "device-entry", axe_source)
    started = requests.post(f"{broker.url}/v1/cli/device", timeout=WAIT_SECONDS).json()
    driver.get(started["verification_uri_complete"])
    assert driver.find_element(By.ID, "user-code").text == started["user_code"]
    check_page(driver, "device-confirm", axe_source)
    driver.find_element(By.ID, "approve").click()
    wait.until(ec.presence_of_element_located((By.ID, "device-done")))
    check_page(driver, "device-done", axe_source)
    driver.get(f"{broker.url}/")

    # Nothing on our pages tripped the Content-Security-Policy.
    logs = driver.get_log("browser")
    violations = [e["message"] for e in logs if "Content Security Policy" in e["message"]]
    assert not violations, violations

    # 6. Sign out: back to the sign-in page, signed out.
    driver.find_element(By.CSS_SELECTOR, "header form button").click()
    wait.until(ec.presence_of_element_located((By.ID, "signed-out")))
    driver.get(f"{broker.url}/")
    wait.until(ec.url_contains("/login"))

    # 7. mallory, whose address the provider never verified, is told why on her roles
    # page and on the refusal page, both usable on a phone.
    driver.find_element(By.ID, "provider-demo").click()
    wait.until(ec.url_contains(broker.stack.oidc.url))
    _sign_in_at_provider(driver, _demo("mallory"))
    wait.until(ec.url_to_be(f"{broker.url}/"))
    why = "your e-mail address is not verified at Demo OpenID Connect provider"
    assert why in driver.find_element(By.ID, "no-roles").text
    check_page(driver, "denied-home", axe_source)
    driver.get(f"{broker.url}/credentials")
    assert why in driver.find_element(By.ID, "no-roles").text

    logs = driver.get_log("browser")
    violations = [e["message"] for e in logs if "Content Security Policy" in e["message"]]
    assert not violations, violations
