"""Checkpoints, services, network policy and sessions through the Sprites SDK.

Run by tests/tests/api_admin.rs, one phase per call, with SPRITES_URL,
SPRITES_TOKEN and SPRITE_NAME set; what the Rust side checks in between
(breaking files through hull exec) is its part; the restored files are
read back through the SDK's filesystem API. Prints one JSON object on its last
line; exits non-zero, with the reason, on anything unexpected.
"""

import json
import os
import sys
import time

from sprites import NetworkPolicy, PolicyRule, SpritesClient

client = SpritesClient(token=os.environ["SPRITES_TOKEN"], base_url=os.environ["SPRITES_URL"])
sprite = client.sprite(os.environ["SPRITE_NAME"])


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


def events(stream):
    got = [(m.type, m.data, m.error) for m in stream]
    if not got or got[-1][0] != "complete":
        fail(f"the stream did not end with complete: {got}")
    return got


def checkpoint():
    """A service with an HTTP port, then a checkpoint that records it."""
    svc_events = [e.type for e in sprite.create_service(
        "web", "httpd", args=["-f", "-p", "8090"], http_port=8090, duration=1.0)]
    if svc_events[-1:] != ["complete"]:
        fail(f"create_service: {svc_events}")
    web = sprite.get_service("web")
    if (web.cmd, web.args, web.http_port) != ("httpd", ["-f", "-p", "8090"], 8090):
        fail(f"the service reads back otherwise: {web}")
    got = events(sprite.create_checkpoint("before the break"))
    listed = sprite.list_checkpoints()
    mine = [c for c in listed if c.comment == "before the break"]
    if len(mine) != 1:
        fail(f"list_checkpoints: {listed}")
    one = sprite.get_checkpoint(mine[0].id)
    if one.id != mine[0].id or one.create_time != mine[0].create_time:
        fail(f"get_checkpoint disagrees with the listing: {one} vs {mine[0]}")
    # The service goes, so that the restore must bring it back.
    sprite.delete_service("web")
    if any(s.name == "web" for s in sprite.list_services()):
        fail("the deleted service is still listed")
    print(json.dumps({"id": one.id, "events": got}))


def restore(checkpoint_id):
    got = events(sprite.restore_checkpoint(checkpoint_id))
    # The restored services start as the restored inner comes up.
    deadline = time.monotonic() + 20
    web = sprite.get_service("web")
    while web.state.status != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        web = sprite.get_service("web")
    print(json.dumps({"events": got, "web": web.state.status if web.state else None,
                      "port": web.http_port}))


def files():
    """The restored files, read back through the SDK's filesystem API."""
    fs = sprite.filesystem("/root")
    print(json.dumps({
        "a": (fs / "work" / "a").read_text(),
        "b": (fs / "b").read_text(),
        "new": (fs / "new").exists(),
        "root": sorted((fs / ".").listdir()),
    }))


def policy():
    before = sprite.get_network_policy()
    wanted = NetworkPolicy(rules=[
        PolicyRule(domain="example.com", action="allow"),
        PolicyRule(domain="*.evil.test", action="deny"),
        PolicyRule(include="defaults"),
    ])
    sprite.update_network_policy(wanted)
    after = sprite.get_network_policy()
    if after != wanted:
        fail(f"the policy read back is {after}, not {wanted}")
    print(json.dumps({"before": len(before.rules), "after": len(after.rules)}))


def sessions(session_id):
    """The session the Rust side left running: listed, then killed."""
    from sprites.session import kill_session

    listed = {s.id: s for s in sprite.list_sessions()}
    if session_id not in listed:
        fail(f"session {session_id} is not listed: {listed}")
    s = listed[session_id]
    if not s.tty or s.is_active or "sleep" not in s.command:
        fail(f"the session reads back otherwise: {s}")
    got = events(kill_session(sprite, session_id, signal="SIGTERM", timeout=5))
    left = [s.id for s in sprite.list_sessions()]
    print(json.dumps({"command": s.command, "events": [t for t, _, _ in got], "left": left}))


phase = sys.argv[1]
if phase == "checkpoint":
    checkpoint()
elif phase == "restore":
    restore(sys.argv[2])
elif phase == "files":
    files()
elif phase == "policy":
    policy()
elif phase == "sessions":
    sessions(sys.argv[2])
else:
    fail(f"unknown phase {phase}")
