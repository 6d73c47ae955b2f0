"""A signal sent through the SDK reaches the command: SIGTERM ends a
sleep, which exits as a shell reports it (128 + 15)."""

import asyncio

from hull_sdk import Live, check, sprite


async def main():
    live = Live(sprite(), ["sh", "-c", "echo ready; exec sleep 1000"])
    await live.start()
    await live.output_contains(b"ready")
    await live.signal("TERM")
    code = await live.wait()
    check(code == 143, f"exit code {code} after SIGTERM")
    print("exec_signal ok")


asyncio.run(main())
