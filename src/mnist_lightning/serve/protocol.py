"""HTTP/1.1 as uvicorn's httptools protocol speaks it, with the limits a server facing strangers needs.

uvicorn's httptools protocol keeps every header it is sent (llhttp itself has no limit), waits forever
for a request that trickles in, and answers malformed HTTP in plain text. Here the head (request line
and headers) is bounded in bytes and in count (431), a request must arrive within ``read_timeout``
seconds plus the time its body needs at a slow client's pace (408), and every refusal at this layer is
the same JSON ``{"error": ...}`` as the app's. Each closes the connection: the framing can no longer be
trusted. The limits live here because these requests never reach the app: they are not yet requests.
"""

import json

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

HEAD_BYTES = 32 * 1024  # request line and headers: nginx's and Node's defaults are 8-16 kB
HEADERS = 100  # as Python's http.client and Go's net/http allow
MIN_RATE = 50_000  # bytes/s: each body byte received buys 1/MIN_RATE s, so a slow upload is never cut off


class ServeConfig(uvicorn.Config):
    """uvicorn's settings, and the read timeout the protocol enforces (picklable for --workers N)."""

    def __init__(self, app, *, read_timeout: float, **options):
        super().__init__(app, http="mnist_lightning.serve.protocol:BoundedHttp", **options)
        self.read_timeout = read_timeout


class Refused(Exception):
    """Raised from a parser callback: httptools stops parsing and the protocol answers ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def too_long() -> Refused:
    return Refused(431, f"the request's headers are over {HEAD_BYTES:,} bytes; send fewer")


class BoundedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a bounded head, a read deadline and JSON refusals."""

    def __init__(self, config: ServeConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.read_timeout = config.read_timeout
        self.deadline = None  # the read timer of the request being received, if any
        self.in_head, self.received = True, 0  # whether a head is being read, and its bytes so far
        self.head_bytes = self.header_count = 0  # what the parser has handed over of it
        self.refusal: Refused | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.arm(self.read_timeout)  # a connection that never sends a byte is a request that never arrives

    def connection_lost(self, exc) -> None:
        self.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.received += len(data) if self.in_head else 0
        super().data_received(data)
        # Still no end of the head after this many bytes: llhttp buffers a long header whole, unseen.
        if self.in_head and self.received > HEAD_BYTES and not self.transport.is_closing():
            self.refuse(too_long())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = self.header_count = 0
        self.arm(self.read_timeout)

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def on_url(self, url: bytes) -> None:
        self.count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > HEADERS:
            raise self.stop(Refused(431, f"the request has over {HEADERS} headers; send fewer"))
        self.count(len(name) + len(value))
        super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.deadline is not None:  # the deadline moves out as the body arrives at a fair pace
            self.arm(self.deadline.when() - self.loop.time() + len(body) / MIN_RATE)

    def on_message_complete(self) -> None:
        self.disarm()
        self.in_head, self.received = True, 0  # what follows is the next request's head
        super().on_message_complete()

    def count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > HEAD_BYTES:
            raise self.stop(too_long())

    def stop(self, refusal: Refused) -> Refused:
        """Remember why parsing stops: uvicorn answers every parser error through send_400_response."""
        self.refusal = refusal
        return refusal

    def arm(self, seconds: float) -> None:
        self.disarm()
        self.deadline = self.loop.call_later(seconds, self.timed_out)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def timed_out(self) -> None:
        self.deadline = None
        nothing_sent = self.in_head and self.received == 0  # a browser's spare connection, say
        answered = not self.in_head and self.cycle.response_started  # a 413 by Content-Length, the body coming
        if nothing_sent or answered:
            self.transport.close()  # no request to answer, or answered already: just hang up
        elif not self.transport.is_closing():
            seconds = f"{self.read_timeout:g}"
            self.refuse(Refused(408, f"the request did not arrive within {seconds} s; send it whole, at once"))

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error: JSON here, with the status of a limit that stopped it."""
        refusal, self.refusal = self.refusal, None
        if refusal is None:
            refusal = Refused(400, "malformed HTTP request; send HTTP/1.1 as curl or any HTTP library does")
        self.refuse(refusal)

    def refuse(self, refusal: Refused) -> None:
        """Answer with JSON and close. An app still waiting for the body sees the client disconnect."""
        self.disarm()
        body = json.dumps({"error": str(refusal)}).encode()
        head = [STATUS_LINE[refusal.status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
