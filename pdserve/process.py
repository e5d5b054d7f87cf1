"""Running one role as a process: start, say "ready ADDRESS" on stdout, serve until
SIGINT/SIGTERM (drain, exit 0) or until the component reports a fatal error (exit 1)."""
from __future__ import annotations

import asyncio
import logging
import signal


async def run_until_signal(component) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    address = await component.start()
    print(f"ready {address}", flush=True)
    fatal = getattr(component, "stopped", None)
    waits = [asyncio.create_task(stop.wait())] + ([asyncio.create_task(fatal.wait())] if fatal else [])
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    await component.close()
    return 1 if getattr(component, "fatal", False) else 0
