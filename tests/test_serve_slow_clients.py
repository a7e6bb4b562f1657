"""generate.py --serve under clients that send slowly, never finish, or send a body in a million
pieces: each is cut off by a limit (a time, a count of connections or pieces), and /health is
answered while it goes on. Run against the real server with the limits lowered by its flags."""
import os
import resource
import signal
import socket
import threading
import time

import pytest
from test_serve import KEY, request, start_server

CAP = 40


@pytest.fixture(scope="module")
def server(tiny_gpt2):
    proc, port = start_server(tiny_gpt2, "--max-connections", str(CAP), "--header-timeout", "1", "--body-timeout", "1")
    yield proc, port
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)


def health_during(port, attack):
    """Run attack() while asking /health; return /health's answer (the request gives up after 30 s)."""
    answer = {}
    worker = threading.Thread(target=attack)
    worker.start()
    time.sleep(0.3)
    try:
        answer["health"] = request(port, "GET", "/health", key=None)
    finally:
        worker.join()
    return answer["health"]


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def answers_of(socks, seconds=30):
    """What the server sends on each connection before it closes it ('' if nothing), all within
    `seconds` (a connection the server leaves open gives what it sent so far)."""
    deadline, answers = time.monotonic() + seconds, []
    for sock in socks:
        received = b""
        try:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        sock.close()
        answers.append(received.decode(errors="replace"))
    return answers


def test_slow_headers_are_cut_off_and_connections_capped(server):
    proc, port = server
    before = open_files(proc.pid)
    most, clients = [0], []

    def attack():                       # 150 clients that each send one byte of a header, then nothing
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"P")
            clients.append(s)
        for _ in range(20):
            most[0] = max(most[0], open_files(proc.pid))
            time.sleep(0.05)
    assert health_during(port, attack) == (200, {"status": "ok"})
    answers = answers_of(clients)
    assert all(a.startswith("HTTP/1.1 408") for a in answers), [a for a in answers if not a.startswith("HTTP/1.1 408")][:3]
    assert most[0] <= before + CAP + 5, (before, most[0])       # not one per client


def test_a_body_promised_and_never_sent_is_cut_off(server):
    _, port = server
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
    clients = []

    def attack():
        for _ in range(60):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            clients[-1].sendall(head)
    assert health_during(port, attack) == (200, {"status": "ok"})
    answers = answers_of(clients)
    assert all(a.startswith("HTTP/1.1 408") and "body" in a for a in answers), answers[:3]


def test_a_body_in_a_million_pieces_is_refused_early(server):
    _, port = server
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = b'{"prompt": "' + b"a" * (1_000_000 - 14) + b'"}'
    pieces = b"".join(b"1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body))) + b"0\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", port))

    def attack():
        try:
            s.sendall(head)
            for i in range(0, len(pieces), 6000):        # 1,000 one-byte chunks at a time
                s.sendall(pieces[i:i + 6000])
        except OSError:                                 # the server closed the connection: it stopped reading
            pass
    assert health_during(port, attack) == (200, {"status": "ok"})
    answer, = answers_of([s])
    assert answer.startswith("HTTP/1.1 400") and "pieces" in answer, answer[:300]
    assert request(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_running_out_of_files_is_logged_once_and_the_server_recovers(tiny_gpt2):
    proc, port = start_server(tiny_gpt2, "--max-connections", "60", "--header-timeout", "1")
    try:
        limit = open_files(proc.pid) + 8                # room for 8 connections, not 60
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        clients = []

        def attack():
            for _ in range(24):
                clients.append(socket.create_connection(("127.0.0.1", port)))
                clients[-1].sendall(b"G")
            time.sleep(1)
        assert health_during(port, attack) == (200, {"status": "ok"})
        answers_of(clients, seconds=0)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert err.count("Too many open files") == 1 and "--max-connections" in err, err[-3000:]
