#!/usr/bin/env python3
"""Drives a headless Chromium over the DevTools protocol to prove the
gpuwatch dashboard loads, draws and updates itself, then saves a screenshot.

Used by .ci/dashboard.sh; needs the `websocket-client` package.

    dashboard_check.py DEVTOOLS_PORT PAGE_URL EXPECTED_GPUS SCREENSHOT.png

It fails (exit 1, saying why) unless, within the deadlines:
  * the page reaches data-state="live" with one card per GPU;
  * every GPU's thermal and power charts drew points, and the thermal
    canvas holds ink (non-transparent pixels), i.e. something was painted;
  * a few seconds later the frame counter, the newest seq, every chart's
    draw count and every thermal chart's point count have all risen, with
    no reload;
  * every card names who EXPECT_USERS (JSON, by GPU index) says runs on
    it: owners on the GPU, owners in a MIG instance, allocated-but-idle
    containers;
  * the page fetched nothing but its own origin (and data: URLs), and
    threw no JavaScript error or console error (a CSP violation is one).
"""

import base64
import json
import os
import sys
import time
import urllib.request

import websocket

LOAD_DEADLINE_S = 30
UPDATE_DEADLINE_S = 30


class DevTools:
    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=10, suppress_origin=True)
        self.next_id = 0
        self.events = []

    def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.time() + 30
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise RuntimeError(f"{method}: no answer")

    def wait_event(self, method, deadline_s):
        deadline = time.time() + deadline_s
        for i, e in enumerate(self.events):
            if e["method"] == method:
                return self.events.pop(i)
        while time.time() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.time()))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if msg.get("method") == method:
                return msg
            if "method" in msg:
                self.events.append(msg)
        raise RuntimeError(f"no {method} within {deadline_s} s")

    def evaluate(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluate failed: {r['exceptionDetails']}")
        return r["result"].get("value")


# Reads the page's machine-checkable state; counts painted pixels of each
# thermal canvas (its background is transparent, so alpha > 0 means ink).
STATE_JS = """
(() => {
  const cards = [...document.querySelectorAll('article.gpu')].map((a) => {
    const t = a.querySelector('canvas.thermal'), p = a.querySelector('canvas.power');
    let ink = 0;
    if (t && t.width && t.height) {
      const d = t.getContext('2d').getImageData(0, 0, t.width, t.height).data;
      for (let i = 3; i < d.length; i += 4) if (d[i] > 0) ink++;
    }
    return { gpu: a.dataset.gpu, health: a.dataset.health, governor: a.dataset.governor,
      thermalPoints: +t.dataset.points, powerPoints: +p.dataset.points,
      thermalDraws: +t.dataset.draws, powerDraws: +p.dataset.draws, ink };
  });
  return JSON.stringify({ state: document.body.dataset.state, updated: +document.body.dataset.updated,
    lastSeq: +document.body.dataset.lastSeq, cards });
})()
"""


# Who each card names: owner chips on the GPU's line, in MIG instance
# lines, and idle allocations (anywhere on the card).
USERS_JS = """
(() => JSON.stringify(Object.fromEntries([...document.querySelectorAll('article.gpu')].map((a) => {
  const owners = (sel) => [...a.querySelectorAll(sel)].map((c) => c.dataset.owner);
  const box = a.querySelector('.users');
  return [a.dataset.gpu, {
    processes: box && box.dataset.processes !== undefined ? +box.dataset.processes : null,
    owners: owners('.users .row:not(.mig) .chip.owner'),
    mig_owners: owners('.users .row.mig .chip.owner'),
    idle: owners('.users .chip.idle'),
  }];
}))))()
"""


def read_state(dt):
    return json.loads(dt.evaluate(STATE_JS))


def poll(dt, deadline_s, ok, what):
    deadline = time.time() + deadline_s
    last = None
    while time.time() < deadline:
        last = read_state(dt)
        if ok(last):
            return last
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not within {deadline_s} s; last state {json.dumps(last)}")


def main():
    if len(sys.argv) != 5:
        print(__doc__)
        return 2
    port, url, expected, shot = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    origin = url.split("/", 3)[:3]
    origin = "/".join(origin)

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        targets = json.load(r)
    page = next(t for t in targets if t.get("type") == "page")
    dt = DevTools(page["webSocketDebuggerUrl"])
    for domain in ("Page", "Runtime", "Network", "Log"):
        dt.call(f"{domain}.enable")
    dt.call("Emulation.setDeviceMetricsOverride", width=1400, height=1050, deviceScaleFactor=1, mobile=False)
    dt.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}])
    dt.call("Page.navigate", url=url)
    dt.wait_event("Page.loadEventFired", LOAD_DEADLINE_S)

    first = poll(
        dt,
        LOAD_DEADLINE_S,
        lambda s: s["state"] == "live"
        and len(s["cards"]) == expected
        and all(c["thermalPoints"] > 0 and c["powerPoints"] > 0 and c["ink"] > 500 for c in s["cards"]),
        "the page to go live and draw every GPU",
    )
    print(f"loaded and drew: {json.dumps(first)}")

    def rose(s):
        if s["updated"] < first["updated"] + 5 or s["lastSeq"] <= first["lastSeq"]:
            return False
        for before, now in zip(first["cards"], s["cards"]):
            if now["thermalDraws"] <= before["thermalDraws"] or now["powerDraws"] <= before["powerDraws"]:
                return False
            if now["thermalPoints"] <= before["thermalPoints"]:
                return False
        return True

    later = poll(dt, UPDATE_DEADLINE_S, rose, "the page to update itself")
    print(f"updated without a reload: {json.dumps(later)}")

    expected_users = json.loads(os.environ.get("EXPECT_USERS", "{}"))
    if expected_users:
        deadline = time.time() + LOAD_DEADLINE_S
        while True:
            users = json.loads(dt.evaluate(USERS_JS))
            missing = [
                f"GPU {gpu} {part}: {name}"
                for gpu, want in expected_users.items()
                for part, names in want.items()
                for name in names
                if name not in users.get(gpu, {}).get(part, [])
            ]
            if not missing:
                break
            if time.time() > deadline:
                raise RuntimeError(f"cards do not name {missing}; they show {json.dumps(users)}")
            time.sleep(0.25)
        print(f"cards name who runs on each GPU: {json.dumps(users)}")

    # Let the charts fill a little more for the picture, then take the
    # whole page at its full height.
    time.sleep(float(os.environ.get("SETTLE_S", "12")))
    size = dt.call("Page.getLayoutMetrics")["cssContentSize"]
    height = min(int(size["height"]) + 1, 4000)
    dt.call("Emulation.setDeviceMetricsOverride", width=1400, height=height, deviceScaleFactor=1, mobile=False)
    time.sleep(1)  # the page redraws its charts for the new size
    png = dt.call("Page.captureScreenshot", format="png")["data"]
    with open(shot, "wb") as f:
        f.write(base64.b64decode(png))
    print(f"screenshot: {shot}")

    # Collect what arrived meanwhile (the live stream never goes quiet, so
    # for a bounded time), then judge requests and errors.
    drain_until = time.time() + 1.0
    dt.ws.settimeout(0.2)
    while time.time() < drain_until:
        try:
            msg = json.loads(dt.ws.recv())
        except websocket.WebSocketTimeoutException:
            break
        if "method" in msg:
            dt.events.append(msg)
    problems = []
    requests = [e["params"]["request"]["url"] for e in dt.events if e["method"] == "Network.requestWillBeSent"]
    foreign = [u for u in requests if not (u.startswith(origin + "/") or u == origin or u.startswith("data:"))]
    if foreign:
        problems.append(f"the page fetched from elsewhere: {foreign}")
    for e in dt.events:
        if e["method"] == "Runtime.exceptionThrown":
            problems.append(f"JavaScript exception: {e['params']['exceptionDetails']}")
        elif e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error":
            problems.append(f"console error: {e['params']['args']}")
        elif e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error":
            entry = e["params"]["entry"]
            problems.append(f"browser error: {entry.get('text')} {entry.get('url', '')}")
    print(f"requests made by the page: {sorted(set(requests))}")
    try:
        dt.call("Browser.close")
    except Exception:  # the browser going away mid-answer is fine
        pass
    if problems:
        for p in problems:
            print(f"FAIL: {p}")
        return 1
    print("dashboard check passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # one clear line instead of a traceback
        print(f"FAIL: {e}")
        sys.exit(1)
