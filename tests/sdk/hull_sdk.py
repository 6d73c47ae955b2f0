"""What the exec scenarios share: the SDK client from the environment the
Rust test sets (SPRITES_URL, SPRITES_TOKEN, SPRITE_NAME, SPRITES_CONTROL_MODE),
and a live command driven through the SDK's own transport, direct or over
the control connection, for what its high-level API does not expose
(resize, signals, output seen while the command runs)."""

import asyncio
import json
import os
import sys

from sprites import SpritesClient
from sprites.exec import _CmdBase
from sprites.websocket import WSCommand


def control_mode() -> bool:
    return os.environ.get("SPRITES_CONTROL_MODE") == "1"


def sprite():
    client = SpritesClient(
        os.environ["SPRITES_TOKEN"],
        base_url=os.environ["SPRITES_URL"],
        control_mode=control_mode(),
    )
    return client.sprite(os.environ["SPRITE_NAME"])


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


class Live:
    """A running command whose output is watched as it comes."""

    def __init__(self, sprite, args, tty=False, rows=24, cols=80):
        self.sprite = sprite
        self.args = args
        self.tty = tty
        self.rows = rows
        self.cols = cols
        self.out = bytearray()
        self.changed = asyncio.Event()

    def _on_output(self, data):
        self.out.extend(data)
        self.changed.set()

    async def start(self):
        if control_mode():
            from sprites.control import get_control_connection

            self.cc = await get_control_connection(self.sprite)
            self.op = await self.cc.start_op(
                "exec", cmd=self.args, tty=self.tty, rows=self.rows, cols=self.cols
            )
            self.op.on_stdout = self._on_output
        else:
            cmd = _CmdBase(
                self.sprite, self.args, tty=self.tty, tty_rows=self.rows, tty_cols=self.cols
            )
            cmd.stdout = self  # write() below
            self.cmd = WSCommand(cmd)
            await self.cmd.start()

    def write(self, data):  # the SDK's stdout sink
        self._on_output(data)

    async def output_contains(self, needle: bytes, timeout=10.0):
        async def wait():
            while needle not in self.out:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def send(self, data: bytes):
        if control_mode():
            await self.op.write(data)
        else:
            await self.cmd._write_stdin(data)

    async def resize(self, rows, cols):
        if control_mode():
            await self.op.resize(cols, rows)
        else:
            await self.cmd.resize(cols, rows)

    async def signal(self, name):
        if control_mode():
            await self.op.signal(name)
        else:
            # WSCommand has no signal method; this is the frame OpConn sends.
            await self.cmd.ws.send(json.dumps({"type": "signal", "signal": name}))

    async def wait(self, timeout=20.0):
        if control_mode():
            return await asyncio.wait_for(self.op.wait(), timeout)
        code = await asyncio.wait_for(self.cmd.wait(), timeout)
        await self.cmd.close()
        return code
