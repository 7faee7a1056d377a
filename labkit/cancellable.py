"""Generation that stops when its client goes away (used by the Ollama-compatible server, chapter 02).

A streamed answer is produced by a *synchronous* generator that holds a model slot until it is
closed. Starlette runs such a generator one step at a time in its thread pool; when the client
disconnects (an interrupted notebook cell, a client-side timeout) nothing asks for the next
step, nothing closes it, and the slot stays taken: every later request for that model waits
forever. Here the generator runs in a thread of its own, driven to its end or until ``stop`` is
set, and is always closed, so its ``finally`` (releasing the model) runs within a token of the
client leaving:

* :class:`CancellableStream` — a ``StreamingResponse`` that sets ``stop`` when the response ends
  for any reason (done, client gone, error);
* :func:`drain` — the same for a non-streamed answer: collects every item while watching for
  the client to disconnect, and raises :class:`ClientGone` if it did.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

_END = object()


class ClientGone(Exception):
    """The client disconnected before the answer was complete; generation was stopped."""


class Producer:
    """Runs ``gen`` to its end in a daemon thread, handing items over through a queue.

    ``stop.set()`` makes it close ``gen`` (and every generator in ``closes``) after the item
    being produced now. Exceptions from ``gen`` are re-raised to the consumer.
    """

    def __init__(self, gen: Iterator, closes: tuple[Iterator, ...] = ()):
        self.gen, self.closes = gen, closes
        self.items: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="labkit-generation", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.gen:
                if self.stop.is_set():
                    break
                self.items.put((True, item))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, who decides what the client sees)
            self.items.put((False, exc))
        finally:
            for g in (self.gen, *self.closes):
                close = getattr(g, "close", None)
                if close is not None:
                    close()
            self.items.put((False, _END))

    async def __aiter__(self) -> AsyncIterator[Any]:
        import anyio
        while True:
            # abandon_on_cancel: a cancelled consumer returns at once; the waiting thread is freed by
            # the _END the producer always puts last.
            ok, item = await anyio.to_thread.run_sync(self.items.get, abandon_on_cancel=True)
            if ok:
                yield item
            elif item is _END:
                return
            else:
                raise item


async def in_fresh_thread(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in a thread of its own that ends with it, awaited. For anything that runs the
    engine (a stream's first item, embeddings, loading): llama.cpp's OpenMP build gives every thread that
    computes a pool of worker threads, and while one long-lived thread (Starlette's thread pool) holds such a
    pool, computing in any other thread ran ~2.7x slower (64 tokens: 0.70 s → 1.9 s, for the server's whole
    life). Short-lived threads, one after another, keep it at full speed."""
    import asyncio
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(setter, value):
        if not done.cancelled():            # the request was cancelled (its client left): nobody waits
            setter(value)

    def run():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001  (handed to the awaiting request)
            loop.call_soon_threadsafe(settle, done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, done.set_result, result)
    threading.Thread(target=run, name="labkit-engine-call", daemon=True).start()
    return await done


def cancellable_stream(gen: Iterator[str], media_type: str, closes: tuple[Iterator, ...] = (), headers: dict | None = None):
    """A Starlette ``StreamingResponse`` over ``gen`` that stops ``gen`` when the response ends."""
    from starlette.responses import StreamingResponse

    class CancellableStream(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:            # done, client gone (cancelled), or a send that failed
                producer.stop.set()

    producer = Producer(gen, closes)
    return CancellableStream(producer.__aiter__(), media_type=media_type, headers=headers)


async def drain(request, gen: Iterator, reduce: Callable[[list], Any] = list, poll_s: float = 0.05) -> Any:
    """``reduce(all items of gen)``, produced in a thread; stops ``gen`` and raises
    :class:`ClientGone` when ``request``'s client disconnects first."""
    import anyio
    producer = Producer(gen)
    items: list = []
    gone, error = False, None
    async with anyio.create_task_group() as tg:
        async def watch():
            nonlocal gone
            while not await request.is_disconnected():
                await anyio.sleep(poll_s)
            gone = True
            producer.stop.set()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            async for item in producer:
                items.append(item)
        except Exception as exc:  # noqa: BLE001  (raised below, outside the task group, which would wrap it)
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if gone:
        raise ClientGone("the client disconnected; generation stopped")
    if error is not None:
        raise error
    return reduce(items)
