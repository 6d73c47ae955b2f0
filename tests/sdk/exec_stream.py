"""A long output streamed through the SDK: every byte arrives, in order
of the count asked for (EXEC_STREAM_BYTES)."""

import os

from hull_sdk import check, control_mode, sprite

n = int(os.environ.get("EXEC_STREAM_BYTES", str(50 * 1024 * 1024)))


class Count:
    def __init__(self):
        self.bytes = 0
        self.nonzero = 0

    def write(self, data):
        self.bytes += len(data)
        self.nonzero += len(data) - data.count(0)


count = Count()
s = sprite()
cmd = s.command("head", "-c", str(n), "/dev/zero", stdout=None if control_mode() else count)
if control_mode():
    # The SDK's control mode hands output over only at the end.
    count.write(cmd.output())
else:
    cmd.run()
check(count.bytes == n, f"got {count.bytes} bytes of {n}")
check(count.nonzero == 0, f"{count.nonzero} bytes were not zero")
print(f"streamed {count.bytes} bytes")
