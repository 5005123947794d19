"""A fault-injecting HTTP proxy in front of an S3 server (the suite's moto server).

    python -m tests.s3_faults --upstream http://127.0.0.1:PORT [--port P]

Every S3 request of the suite goes through it (tests/conftest.py points AWS_ENDPOINT_URL
here before Ray starts, so Ray's workers use it too). It forwards requests unchanged until a
test turns faults on; then a fraction ``rate`` of requests meets one of:

- ``slowdown``: 503 SlowDown (S3's throttling answer), nothing forwarded;
- ``internal``: 500 InternalError, nothing forwarded;
- ``reset``: the request is read, then the connection is reset with no answer;
- ``cut_put``: a request with a body (a PUT, a part upload) is forwarded with only the first
  half of its body, then both connections are reset (the client sees a reset mid-upload);
- ``cut_body``: the answer's headers and the first half of its body reach the client, then the
  connection is reset (a GET cut mid-download).

and, only when named (it is not transient: clients do not retry it),
- ``denied``: 403 AccessDenied to a request with a body (a write), nothing forwarded: a role
  that may read the bucket but not write it.

Control, over HTTP on the same port (no bucket can be named ``__faults__``):
``PUT /__faults__`` with ``{"rate": 0.1, "seed": 0, "kinds": [...]}`` sets the faults and zeroes
the counts; ``GET /__faults__`` returns ``{"requests": N, "faults": {kind: n}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
import sys
from collections import Counter
from urllib.parse import urlparse

KINDS = ("slowdown", "internal", "reset", "cut_put", "cut_body")  # transient: the default
ALL_KINDS = KINDS + ("denied",)
CONTROL = "/__faults__"


class Faults:
    """What to inject and what was injected (one event loop: no lock needed)."""

    def __init__(self) -> None:
        self.rate, self.kinds, self.rng = 0.0, KINDS, random.Random(0)
        self.requests, self.counts = 0, Counter()

    def set(self, rate: float, seed: int = 0, kinds=KINDS) -> None:
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self.rate, self.kinds, self.rng = float(rate), tuple(kinds), random.Random(seed)
        self.requests, self.counts = 0, Counter()

    def draw(self, has_body: bool) -> str | None:
        """The fault for the next request, or None."""
        self.requests += 1
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        kinds = [k for k in self.kinds if has_body or k not in ("cut_put", "denied")]
        if not kinds:
            return None
        kind = self.rng.choice(kinds)
        self.counts[kind] += 1
        return kind


async def read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]] | None:
    """(first line, headers) of a request or response; None at a clean end of the stream."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    lines = raw.decode("latin-1").split("\r\n")
    headers = [tuple(p.strip() for p in ln.split(":", 1)) for ln in lines[1:] if ln]
    return lines[0], headers


def header(headers, name: str) -> str | None:
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


async def read_body(reader: asyncio.StreamReader, headers, until_eof: bool = False) -> bytes:
    """The raw body (chunk framing kept, so it is forwarded byte for byte)."""
    if (header(headers, "transfer-encoding") or "").lower() == "chunked":
        out = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            out += line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    t = await reader.readuntil(b"\r\n")
                    out += t
                    if t == b"\r\n":
                        return bytes(out)
            out += await reader.readexactly(size + 2)
    length = header(headers, "content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    return await reader.read() if until_eof else b""


def encode_head(first: str, headers) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def error_response(status: int, code: str, message: str) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>kdpipe-fault</RequestId></Error>").encode()
    reason = {403: "Forbidden", 500: "Internal Server Error", 503: "Slow Down"}[status]
    head = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))), ("x-amz-request-id", "kdpipe-fault")]
    return encode_head(f"HTTP/1.1 {status} {reason}", head) + body


class Proxy:
    def __init__(self, upstream: str) -> None:
        u = urlparse(upstream)
        self.host, self.port = u.hostname, u.port or 80
        self.faults = Faults()

    async def control(self, method: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        status = "200 OK"
        if method == "PUT":
            try:
                self.faults.set(**json.loads(body or b"{}"))
            except (ValueError, TypeError) as e:
                status, out = "400 Bad Request", json.dumps({"error": str(e)}).encode()
        if status.startswith("200"):
            out = json.dumps({"requests": self.faults.requests, "faults": dict(self.faults.counts),
                              "rate": self.faults.rate}).encode()
        writer.write(encode_head(f"HTTP/1.1 {status}", [("Content-Type", "application/json"),
                                                        ("Content-Length", str(len(out)))]) + out)
        await writer.drain()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request on a client connection; False once the connection is done."""
        head = await read_head(reader)
        if head is None:
            return False
        first, headers = head
        method, target = first.split(" ", 2)[:2]
        if (header(headers, "expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            headers = [(k, v) for k, v in headers if k.lower() != "expect"]
        body = await read_body(reader, headers)
        if urlparse(target).path == CONTROL:
            await self.control(method, body, writer)
            return True
        fault = self.faults.draw(has_body=len(body) > 0)
        if fault == "slowdown":
            writer.write(error_response(503, "SlowDown", "Please reduce your request rate."))
        elif fault == "internal":
            writer.write(error_response(500, "InternalError", "We encountered an internal error. Please try again."))
        elif fault == "denied":
            writer.write(error_response(403, "AccessDenied", "Access Denied"))
        if fault in ("slowdown", "internal", "denied"):
            await writer.drain()
            return True
        if fault == "reset":
            reset(writer)
            return False
        up_r, up_w = await asyncio.open_connection(self.host, self.port)
        try:
            fwd = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")] + [("Connection", "close")]
            if fault == "cut_put":
                up_w.write(encode_head(first, fwd) + body[: len(body) // 2])
                await up_w.drain()
                reset(up_w)
                reset(writer)
                return False
            up_w.write(encode_head(first, fwd) + body)
            await up_w.drain()
            status_line, rheaders = await read_head(up_r)
            status = int(status_line.split(" ", 2)[1])
            no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
            rbody = b"" if no_body else await read_body(up_r, rheaders, until_eof=True)
        finally:
            if not up_w.transport.is_closing():
                up_w.close()
        keep = [(k, v) for k, v in rheaders if k.lower() not in ("connection", "keep-alive")]
        if not no_body and header(rheaders, "content-length") is None and \
                (header(rheaders, "transfer-encoding") or "").lower() != "chunked":
            keep.append(("Content-Length", str(len(rbody))))  # was delimited by the upstream's close
        if fault == "cut_body" and len(rbody) > 1:
            writer.write(encode_head(status_line, keep) + rbody[: len(rbody) // 2])
            await writer.drain()
            reset(writer)
            return False
        writer.write(encode_head(status_line, keep) + rbody)
        await writer.drain()
        return True


async def serve(upstream: str, port: int) -> None:
    proxy = Proxy(upstream)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port, limit=2**20)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="A fault-injecting HTTP proxy in front of an S3 server (tests).")
    p.add_argument("--upstream", required=True, help="the S3 server's endpoint, e.g. http://127.0.0.1:5000")
    p.add_argument("--port", type=int, default=0, help="port to listen on, 127.0.0.1 only (0: any free port)")
    args = p.parse_args(argv)
    asyncio.run(serve(args.upstream, args.port))
    return 0


class FaultControl:
    """The test side: turn faults on and off, read what was injected (urllib, no S3 client)."""

    def __init__(self, endpoint: str) -> None:
        self.url = endpoint.rstrip("/") + CONTROL

    def _call(self, body: dict | None = None) -> dict:
        import urllib.request

        req = urllib.request.Request(self.url, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "PUT")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def set(self, rate: float, seed: int = 0, kinds=KINDS) -> dict:
        """Inject faults into a fraction ``rate`` of the requests from now on (counts zeroed)."""
        return self._call({"rate": rate, "seed": seed, "kinds": list(kinds)})

    def report(self) -> dict:
        """{"requests": N, "faults": {kind: n}, "rate": r} since the last ``set``."""
        return self._call()


if __name__ == "__main__":
    sys.exit(main())
