"""The baseline for the HTTP benchmark: a bare aiohttp handler on the same machine.

It reads the request body and answers a small JSON document, which is the least any
HTTP queue server must do per request. Run as ``python -m bench.bare_server PORT``.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"MessageId": "00000000-0000-0000-0000-000000000000"})


def main() -> None:
    app = web.Application()
    app.router.add_post("/", handle)
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=loop)


if __name__ == "__main__":
    main()
