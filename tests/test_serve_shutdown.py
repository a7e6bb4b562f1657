"""generate.py --serve on SIGTERM: the requests in flight are answered within the grace period,
then the server stops even if a client holds a half-sent body; a second signal stops it at once."""
import signal
import socket
import subprocess
import threading
import time

from test_serve import KEY, greedy_alone, request, start_server

HALF_SENT = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
             + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")


def stopped(proc, seconds=60):
    """The server's output once it has stopped by itself; killed (and the test failed) if it has not."""
    try:
        return proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the server was still running {seconds} s after the signal") from None


def test_sigterm_answers_the_requests_in_flight_then_stops_despite_a_half_sent_body(tiny_gpt2):
    proc, port = start_server(tiny_gpt2, "--grace-period", "8", "--body-timeout", "600")
    holder = socket.create_connection(("127.0.0.1", port))
    holder.sendall(HALF_SENT)
    result = {}
    asking = threading.Thread(target=lambda: result.update(answer=request(
        port, "POST", "/v1/completions", {"prompt": "Why", "max_tokens": 16, "temperature": 0})))
    asking.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = stopped(proc)                             # it hung here for ever before the grace period
    asking.join()
    holder.close()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "cut off" in out, out
    status, answer = result["answer"]
    assert status == 200 and answer["choices"][0]["text"] == greedy_alone(tiny_gpt2, "Why", 16)


def test_a_second_signal_stops_at_once(tiny_gpt2):
    proc, port = start_server(tiny_gpt2, "--grace-period", "600", "--body-timeout", "600")
    holder = socket.create_connection(("127.0.0.1", port))
    holder.sendall(HALF_SENT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert proc.poll() is None                          # still waiting for the half-sent body: within the grace
    proc.send_signal(signal.SIGTERM)
    out, err = stopped(proc)
    holder.close()
    assert proc.returncode == 0 and "Traceback" not in err, err
