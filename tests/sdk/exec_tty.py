"""A TTY session: the terminal has the size asked for, a resize reaches
it, input is echoed, and the exit code comes back."""

import asyncio

from hull_sdk import Live, check, sprite


async def main():
    live = Live(sprite(), ["sh", "-c", "stty size; read x; stty size; exit 5"], tty=True, rows=24, cols=80)
    await live.start()
    await live.output_contains(b"24 80")
    await live.resize(40, 100)
    await live.send(b"go\r")
    await live.output_contains(b"40 100")
    code = await live.wait()
    check(code == 5, f"exit code {code}; output {bytes(live.out)!r}")
    check(b"go" in live.out, f"input not echoed: {bytes(live.out)!r}")
    print("exec_tty ok")


asyncio.run(main())
