"""hull's files watch (GET .../fs/watch, a WebSocket of inotify events):
changes made through the files API under a watched tree, a directory made
after the watch began included, come back as events.

Run by tests/tests/api_files.rs with SPRITES_URL, SPRITES_TOKEN and
SPRITE_NAME set; exits non-zero (with the reason) on the first mismatch.
"""

import json
import os
import sys
import time

import httpx
from websockets.sync.client import connect

url, token, name = os.environ["SPRITES_URL"], os.environ["SPRITES_TOKEN"], os.environ["SPRITE_NAME"]
auth = {"Authorization": f"Bearer {token}"}
fs = f"{url}/v1/sprites/{name}/fs"


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def put(path, data):
    r = httpx.put(f"{fs}/write", params={"path": path, "mkdirParents": "true"}, headers=auth, content=data)
    check(r.status_code == 200, f"write {path}: {r.status_code} {r.text}")


put("/watched/seed", b"x")
ws_url = url.replace("http://", "ws://") + f"/v1/sprites/{name}/fs/watch?path=/watched&recursive=true"
with connect(ws_url, additional_headers=auth, proxy=None, compression=None) as ws:
    put("/watched/a.txt", b"hello")
    put("/watched/sub/deeper/b.txt", b"made after the watch began")
    # Give the watcher a moment to add the new directories, then write again.
    time.sleep(0.5)
    put("/watched/sub/deeper/c.txt", b"c")
    r = httpx.delete(f"{fs}/delete", params={"path": "/watched/a.txt"}, headers=auth)
    check(r.status_code == 200, f"delete: {r.status_code} {r.text}")
    seen = []
    deadline = time.time() + 10
    want = {("moved_to", "/watched/a.txt"), ("moved_to", "/watched/sub/deeper/c.txt"), ("delete", "/watched/a.txt")}
    while time.time() < deadline and not want <= {(e["type"], e["path"]) for e in seen}:
        try:
            seen.append(json.loads(ws.recv(timeout=1)))
        except TimeoutError:
            pass
    got = {(e["type"], e["path"]) for e in seen}
    check(want <= got, f"missing events {want - got}; got {seen}")
    check(("create", "/watched/sub") in got, f"no create of /watched/sub in {seen}")

# Without a read token there is no watch.
r = httpx.get(f"{fs}/watch", params={"path": "/watched"}, headers={"Authorization": "Bearer nope"})
check(r.status_code == 401, f"watch without a valid token: {r.status_code}")
print("watch ok")
