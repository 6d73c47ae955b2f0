"""Commands through the SDK's high-level API: output, exit codes, stderr,
env and cwd, stdin, a program that does not exist."""

import io
import os

from sprites.exceptions import ExitError

from hull_sdk import check, sprite

s = sprite()

r = s.run("echo", "hello", capture_output=True)
check(r.returncode == 0 and r.stdout == b"hello\n", f"echo hello: {r}")

r = s.run("sh", "-c", "echo out; echo err >&2; exit 3", capture_output=True)
check(r.returncode == 3, f"exit 3: {r}")
check(r.stdout == b"out\n" and r.stderr == b"err\n", f"streams: {r}")

out = s.command("sh", "-c", 'echo "$FOO"; pwd', env={"FOO": "bar baz"}, cwd="/tmp").output()
check(out == b"bar baz\n/tmp\n", f"env and cwd: {out!r}")

try:
    s.command("false").run()
    check(False, "false did not raise")
except ExitError as e:
    check(e.exit_code() == 1, f"false: {e.exit_code()}")

data = os.urandom(1024 * 1024)
out = s.command("cat", stdin=io.BytesIO(data)).output()
check(out == data, f"cat gave {len(out)} bytes back of {len(data)}")
out = s.command("wc", "-c", stdin=io.BytesIO(b"12345")).output()
check(out.strip() == b"5", f"wc -c: {out!r}")

r = s.run("no-such-program-here", capture_output=True)
check(r.returncode == 127, f"missing program: {r}")
check(b"no-such-program-here" in r.stderr, f"missing program's message: {r}")

print("exec_run ok")
