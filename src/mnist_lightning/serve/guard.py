"""Who may drive the server from a browser: its own page only, by the request's Origin and Host.

A page on any site can make its visitor's browser POST a form to 127.0.0.1 (a "simple" request needs no
preflight), and DNS rebinding lets such a page read the answers under its own name. curl and Python
clients send no Origin and are not concerned.
"""

import ipaddress
import socket
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def host_names(bound: str) -> set[str]:
    """The Host header values (names, without the port) a server bound to ``bound`` answers to."""
    if bound in ("", "0.0.0.0", "::"):  # every interface: this machine's names and addresses
        names = {socket.gethostname(), socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
        return {name.lower() for name in names} | set(LOOPBACK)
    try:
        loopback = bound == "localhost" or ipaddress.ip_address(bound).is_loopback
    except ValueError:
        loopback = False
    return set(LOOPBACK) if loopback else {bound.lower()}


def split_host(value: str, default_port: int | None) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6]:port`` as (lower-case name, port); None if it cannot be parsed."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").rstrip("."), parts.port or default_port
    except ValueError:
        return None


class OwnPageOnly:
    """Refuses what a browser sends on behalf of another web page, before the app sees the request.

    A page on any site can make its visitor's browser POST a form to 127.0.0.1 (a "simple" request
    needs no preflight), and DNS rebinding lets such a page read the answers under its own name. So a
    request whose Host is not a name this server answers to gets 400 (as Django's ALLOWED_HOSTS and
    Starlette's TrustedHostMiddleware do), and one whose Origin is not the server's own page, nor one of
    ``cors_origins``, gets 403. Clients that are not browsers (curl, Python) send no Origin.
    """

    def __init__(self, app, hosts: set[str], cors_origins: list[str]):
        self.app, self.hosts, self.origins = app, hosts, set(cors_origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        name = split_host(host, None)
        if "*" not in self.hosts and (name is None or name[0] not in self.hosts):
            error = (
                400,
                f"Host {host[:100]!r} is not a name this server answers to; start it with --allowed_hosts NAME "
                "to answer to another name",
            )
        elif origin is None or "*" in self.origins or origin in self.origins or same_origin(origin, host):
            return await self.app(scope, receive, send)
        else:
            error = (
                403,
                f"requests from the page at {origin[:100]} are refused: only this server's own page may call it; "
                "start it with --cors_origins ORIGIN to allow another",
            )
        await JSONResponse({"error": error[1]}, status_code=error[0])(scope, receive, send)


def same_origin(origin: str, host: str) -> bool:
    """Whether the page at ``origin`` (scheme://name[:port]) is this server's own, reached as ``host``."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https"):  # "null": a sandboxed frame or a file:// page
        return False
    default = 443 if parts.scheme == "https" else 80  # behind a TLS proxy the page is https, the Host the same name
    return split_host(parts.netloc, default) == split_host(host, default)
