"""The server's HTTP under slow, broken or hostile clients: the limits uvicorn leaves to its user.

uvicorn parses HTTP/1.1 (with h11) and runs the application. On its own it waits for ever for a
request's header or body, accepts connections until the process runs out of file descriptors (and
then asyncio logs the failure on every retry), parses a body in a million 1-byte chunks a million
times, and on SIGTERM waits for every request in flight however long its client takes to send it.
Here, in two small subclasses of uvicorn's own:

    header time limit   a request's header must be in within --header-timeout seconds of the
                        connection (or of the previous answer on it): else 408 and close
    body time limit     its body within --body-timeout seconds of its header: else 408 and close
    body pieces         at most MAX_PIECES pieces per body (a chunk of a chunked body, or one
                        network read): each piece costs a parse whatever its size, so a limit on
                        bytes alone does not bound the work a body makes
    connection cap      at most --max-connections open at once: the rest wait in the kernel's
                        listen queue until one closes, so the process stays below its open-file
                        limit; should it reach the limit anyway, that is logged once
    grace period        on SIGTERM or Ctrl-C the requests in flight have --grace-period seconds
                        to finish; then every connection is closed. A second signal stops at once.
"""
import asyncio
import dataclasses
import errno
import logging
import resource

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_PIECES = 10_000              # pieces of one request's body
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
log = logging.getLogger("uvicorn.error")


@dataclasses.dataclass
class Limits:
    header_timeout: float = 10.0     # seconds for a request's header
    body_timeout: float = 30.0       # seconds for its body
    max_connections: int = 0         # open at once; 0: half the open-file limit, at most 1,000
    grace_period: float = 30.0       # seconds the requests in flight have to finish after SIGTERM

    def __post_init__(self):
        if not self.max_connections:
            self.max_connections = max(1, min(1000, open_file_limit() // 2))


def open_file_limit():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class CountedConnection(h11.Connection):
    """h11's connection, refusing a body that arrives in more than MAX_PIECES pieces."""
    pieces, refusal = 0, None

    def next_event(self):
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.pieces = 0
        elif isinstance(event, h11.Data):
            self.pieces += 1
            if self.pieces > MAX_PIECES:        # uvicorn answers a protocol error with a 400 and closes
                self.refusal = f"the body came in more than {MAX_PIECES:,} pieces: send it in fewer, larger chunks"
                raise h11.RemoteProtocolError(self.refusal, 400)
        return event


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with a deadline for each phase a client may stall in: sending
    a request's header, sending its body. The response's own time is not limited (a long answer is
    the server's doing, not the client's)."""

    def __init__(self, limits, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits, self.phase, self.timer, self.heard = limits, None, None, False
        self.conn = CountedConnection(h11.SERVER)

    def connection_made(self, transport):
        super().connection_made(transport)
        self.watch()

    def data_received(self, data):
        self.heard = True
        super().data_received(data)
        self.watch()

    def on_response_complete(self):
        super().on_response_complete()
        self.watch()

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()
        super().connection_lost(exc)

    def watch(self):
        """Start the clock of the phase the client is in, when it enters it."""
        state = self.conn.their_state
        phase = "header" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase == self.phase or self.transport.is_closing():
            return
        if self.timer is not None:
            self.timer.cancel()
        self.phase, self.heard, self.timer = phase, False, None
        if phase is not None:
            limit = self.limits.header_timeout if phase == "header" else self.limits.body_timeout
            self.timer = self.loop.call_later(limit, self.too_slow)

    def too_slow(self):
        """408 and close; a keep-alive connection on which nothing new was sent just closes (a 408
        there would be read as the answer to the client's next request)."""
        self.timer = None
        started = self.phase == "header" and self.heard or self.phase == "body" and not self.cycle.response_started
        if started and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            limit = self.limits.header_timeout if self.phase == "header" else self.limits.body_timeout
            message = f"the request's {self.phase} did not arrive within {limit:g} seconds\n".encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(message), message))
        self.transport.close()

    def send_400_response(self, msg):
        """uvicorn's answer to a protocol error, with the reason when it is ours."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            super().send_400_response(self.conn.refusal or msg)
        else:
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, accepting connections itself (up to the cap) and shutting down within the
    grace period."""

    def __init__(self, config, limits):
        super().__init__(config)
        self.limits, self.cut_short, self.accepting = limits, 0, []

    async def startup(self, sockets=None):
        await self.lifespan.startup()
        self.servers = []
        self.accepting = [asyncio.create_task(self.accept(sock)) for sock in sockets]
        self.started = True

    async def accept(self, sock):
        loop, connections, said = asyncio.get_running_loop(), self.server_state.connections, False
        sock.setblocking(False)
        while True:
            while len(connections) >= self.limits.max_connections:
                await asyncio.sleep(0.05)                 # the others wait in the listen queue
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as e:
                if e.errno in OUT_OF_RESOURCES and not said:
                    said = True
                    log.error(f"cannot accept a connection ({e.strerror}) with {len(connections)} open; new clients"
                              f" wait until some close (the open-file limit is {open_file_limit()}: lower"
                              " --max-connections, or raise the limit with ulimit -n). Said once, not per try.")
                await asyncio.sleep(0.1)
                continue
            protocol = GuardedProtocol(self.limits, config=self.config, server_state=self.server_state,
                                       app_state=self.lifespan.state)
            try:
                await loop.connect_accepted_socket(lambda: protocol, client)
            except OSError:
                client.close()

    async def shutdown(self, sockets=None):
        """Stop accepting; close idle connections; give the requests in flight the grace period,
        then close every connection and cancel what is left."""
        for task in self.accepting:
            task.cancel()
        for sock in sockets or []:
            sock.close()
        connections, tasks, loop = self.server_state.connections, self.server_state.tasks, asyncio.get_running_loop()
        for connection in list(connections):
            connection.shutdown()                       # idle ones close now, busy ones after their answer
        deadline = loop.time() + self.limits.grace_period
        while (connections or tasks) and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.cut_short = len(tasks)
        for connection in list(connections):
            connection.transport.abort()                # their handlers see the client gone, and end
        deadline = loop.time() + 1
        while tasks and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(tasks):
            task.cancel()
        await self.lifespan.shutdown()

    def handle_exit(self, sig, frame):
        if self.should_exit:
            self.force_exit = True                      # a second signal: stop at once
        super().handle_exit(sig, frame)
