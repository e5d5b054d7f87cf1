"""An LLMEngine on its own thread, for servers.

Other threads never touch the engine (LLMEngine.write_kv aside): they submit functions
with call(), which run on the loop thread between steps (in submission order), and receive each step's
outputs through the on_step callback. If a step raises, the engine is unusable:
on_fatal is called once and the loop stops. An optional poll(engine) runs before
every step and while idle; while it returns True (work in flight outside the steps,
like KV transfers), the idle loop wakes every 0.2 ms to call it again."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable

import torch

from pdserve.engine.llm_engine import LLMEngine, StepBatch


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_step: Callable[[StepBatch], None],
                 on_fatal: Callable[[BaseException], None], poll: Callable[[LLMEngine], bool] | None = None):
        self.engine = engine
        self.on_step, self.on_fatal, self.poll = on_step, on_fatal, poll
        self.commands: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.stopping = False
        self.failed: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stopping = True
        self.commands.put(None)
        if self.thread.is_alive():
            self.thread.join()

    def call(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run fn(engine) on the loop thread; its result or exception lands in the future."""
        fut: Future = Future()
        if self.failed is not None or self.stopping:
            fut.set_exception(RuntimeError("the engine is not running"))
        else:
            self.commands.put((fn, fut))
        return fut

    def _run(self) -> None:
        try:
            device = getattr(self.engine, "device", None)
            if device is not None and device.type == "cuda":
                # the current device is per thread: kernels launched here (Triton's included) and
                # NCCL communicators created here belong to the engine's device, not to device 0
                torch.cuda.set_device(device)
            while not self.stopping:
                busy = self.poll is not None and self.poll(self.engine)
                # transfers in flight: poll them every 0.2 ms; polling faster takes the GIL
                # from the node's other threads and made TTFT worse
                self._drain(block=not self.engine.has_work(), timeout=0.0002 if busy else 0.5)
                if self.engine.has_work() and not self.stopping:
                    batch = self.engine.step()
                    if batch:
                        self.on_step(batch)
        except BaseException as e:  # the engine itself broke: nothing it holds can be trusted
            self.failed = e
            self._fail_pending(e)
            self.on_fatal(e)

    def _drain(self, block: bool, timeout: float) -> None:
        try:
            item = self.commands.get(timeout=timeout) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # a bad command fails its caller, not the engine
                    fut.set_exception(e)
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                return
        self.stopping = self.stopping or item is None

    def _fail_pending(self, e: BaseException) -> None:
        while True:
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[1].done():
                item[1].set_exception(RuntimeError(f"the engine failed: {e}"))
