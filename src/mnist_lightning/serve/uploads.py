"""Reading an upload: its body within a limit, the file in a multipart form, and the rest of one refused unread.

``read_body`` and ``LingeringClose`` are for any route that takes a body: the first refuses an over-limit
body with the JSON 413, the second makes sure every client can read such an answer.
"""

import asyncio
import logging

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

# What is read and thrown away of a body the server has answered without reading (nginx's lingering
# close, whose lingering_time is 30 s and lingering_timeout 5 s): enough for a photo several times the
# limit on a slow link, not enough for a hostile endless body to hold the worker.
LINGER_BYTES = 100_000_000
LINGER_SECONDS = 30
LINGER_IDLE_SECONDS = 5  # a client that sends nothing for this long has stopped sending
# A form with a digit has a field or two. Each part costs Python calls on the event loop: 900,000 empty
# parts in a 9 MB body took 7 s of it, a stall for every client.
MAX_PARTS = 16
# The parser logs a warning for each malformed upload before it raises; the client's 400 says it already,
# and no client should be able to fill the server's log. So it gets a logger of its own, outside logging's
# tree, that passes on errors only.
PARSER_LOG = logging.Logger("python_multipart.multipart", logging.ERROR)


class BadRequest(Exception):
    """A request the client can fix: answered with its status and ``{"error": message, **extra}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.headers, self.body = status, headers, {"error": message, **extra}


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or the JSON 413 once it is known to be over ``max_bytes``."""
    too_big = BadRequest(413, f"the upload is over the server's limit of {max_bytes:,} bytes; send a smaller image")
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise too_big  # refused before reading any of it; LingeringClose reads the rest
    body = bytearray()
    try:
        async for chunk in request.stream():  # a chunked upload has no length to check up front
            body += chunk
            if len(body) > max_bytes:
                raise too_big
    except ClientDisconnect:  # hung up mid-upload: nobody reads this answer, and nothing is logged
        raise BadRequest(400, "the client closed the connection before its upload ended") from None
    return bytes(body)


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The first file in a multipart/form-data body, parsed in memory (Starlette's form() spools big ones to disk).

    Parsing stops at the end of that file, and only its data is kept: the other fields are not wanted.
    """
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise BadRequest(400, "malformed multipart upload: its Content-Type has no boundary")
    parts, headers, file = 0, {}, None
    field, value = bytearray(), bytearray()

    def part_begin() -> None:
        nonlocal parts, headers
        parts, headers = parts + 1, {}
        if parts > MAX_PARTS:
            raise BadRequest(400, f"the multipart upload has over {MAX_PARTS} parts; send the image alone")

    def header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def headers_finished() -> None:
        nonlocal file
        if b"filename" in parse_options_header(headers.get(b"content-disposition", b""))[1]:
            file = bytearray()

    def part_data(data: bytes, start: int, end: int) -> None:
        if file is not None:
            file.extend(data[start:end])

    def part_end() -> None:
        if file is not None:
            raise FileFound

    callbacks = {
        "on_part_begin": part_begin,
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": header_end,
        "on_headers_finished": headers_finished,
        "on_part_data": part_data,
        "on_part_end": part_end,
    }
    try:  # the parser bounds a part's header size and count itself, and says so with a FormParserError
        parser = MultipartParser(boundary, callbacks)
        parser.logger = PARSER_LOG
        parser.write(body)
        parser.finalize()
    except FileFound:
        return bytes(file)
    except FormParserError as err:
        raise BadRequest(400, f"malformed multipart upload ({err}); send the image as -F file=@digit.png") from None
    if file is not None:
        raise BadRequest(400, "malformed multipart upload: it ends before its closing boundary")
    raise BadRequest(400, "the multipart upload holds no file; send the image as a file field: -F file=@digit.png")


class FileFound(Exception):
    """Stops the multipart parser at the end of the file: nothing after it is read."""


class LingeringClose:
    """Reads and throws away the body of a request answered before it was read, then closes the connection.

    An answer given from the headers alone (413 by Content-Length, 401, 415, a refused Origin) leaves the
    body unread. Closing a socket with unread data makes the kernel send a reset instead of a clean close,
    and the reset destroys the answer in flight: urllib, which sends ``Connection: close`` and reads only
    once its whole body is sent, saw ``BrokenPipeError`` or ``ConnectionResetError`` rather than the 413.
    So such an answer says ``Connection: close``, and before it ends up to LINGER_BYTES of the body are
    read, within LINGER_SECONDS. A client that waits for ``100 Continue`` has sent no body and gets none.
    """

    def __init__(
        self, app, max_bytes: int = LINGER_BYTES, seconds: float = LINGER_SECONDS, idle: float = LINGER_IDLE_SECONDS
    ):
        self.app, self.max_bytes, self.seconds, self.idle = app, max_bytes, seconds, idle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # lower-case names, as the ASGI spec says
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        state = {"unread": has_body, "waiting_for_continue": headers.get(b"expect", b"").lower() == b"100-continue"}

        async def tracked_receive():
            message = await receive()
            state["waiting_for_continue"] = False  # uvicorn sent 100 Continue on this first receive
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["unread"] = False
            return message

        async def lingering_send(message) -> None:
            if not state["unread"]:
                return await send(message)
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({**message, "more_body": True})  # the answer goes out now, the drain after it
                if not state["waiting_for_continue"]:
                    await self.discard(tracked_receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracked_receive, lingering_send)

    async def discard(self, receive) -> None:
        loop = asyncio.get_running_loop()
        deadline, left = loop.time() + self.seconds, self.max_bytes
        try:
            while left > 0:
                timeout = min(self.idle, deadline - loop.time())
                message = await asyncio.wait_for(receive(), max(timeout, 0))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                left -= len(message.get("body", b""))
        except TimeoutError:
            pass
