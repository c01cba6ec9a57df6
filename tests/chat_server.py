"""A chat-completions server on 127.0.0.1 for tests, told per request how to misbehave."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENTS = {"list-content": [{"type": "text", "text": "A cat."}], "null-content": None, "number-content": 7}


class ChatServer:
    """`script` is a list of behaviours used in order, then `default` forever:
    "ok", "slow", "429" (Retry-After: `retry_after`), "500", any other status code such as "401",
    "bad-json", "no-choices", "list-content", "null-content", "number-content", "null-usage" (an answer
    without token counts), "short-body" (Content-Length promises more than is sent), "hang-up" (closes
    without answering), "reset" (resets the connection without answering), "trickle" (a long body, one
    byte every 0.05 s)."""

    def __init__(self, default: str = "ok", script: list[str] | None = None, delay: float = 0.0, retry_after: str = "0"):
        self.default, self.script, self.delay, self.retry_after = default, list(script or []), delay, retry_after
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.questions: list[str] = []
        self.statuses: list[int] = []
        self.times: list[float] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                self.left = False
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][0]["content"]
                with server.lock:
                    behaviour = server.script.pop(0) if server.script else server.default
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.questions.append(question)
                    server.times.append(time.monotonic())
                try:
                    if behaviour == "slow" or server.delay:
                        time.sleep(server.delay or 0.2)
                    if behaviour == "429":
                        self._send(429, b'{"error": "rate limited"}', {"Retry-After": server.retry_after})
                    elif behaviour == "500":
                        self._send(500, b"oops")
                    elif behaviour.isdigit():
                        self._send(int(behaviour), b'{"error": "refused"}')
                    elif behaviour == "bad-json":
                        self._send(200, b'{"choices": [{"message": ')
                    elif behaviour == "no-choices":
                        self._send(200, b'{"choices": []}')
                    elif behaviour in CONTENTS:
                        message = {"role": "assistant", "content": CONTENTS[behaviour]}
                        self._send(200, json.dumps({"choices": [{"message": message}]}).encode())
                    elif behaviour == "short-body":
                        self._send(200, b'{"choices": [', {"Content-Length": "100"})
                    elif behaviour == "hang-up":
                        self._leave()
                    elif behaviour == "reset":
                        self._leave()
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                    elif behaviour == "trickle":
                        self._trickle(b" " * 200 + self._answer(question, usage=True))
                    else:
                        self._send(200, self._answer(question, usage=behaviour != "null-usage"))
                finally:
                    self._leave()

            def _answer(self, question, usage):
                pair = re.match(r"In a photo, how does a (.+) look different from a (.+)\? Give", question)
                if question.startswith("The images show "):  # a meta-prompt: questions with a class slot
                    task = question[len("The images show "):].split(".")[0]
                    text = "\n".join(f"{i}. Describe how a {{}} looks in {task}, detail {i}." for i in range(1, 5))
                elif pair:  # a differential question: attribute lines "A | B"
                    a, b = pair.groups()
                    text = (f"color: a photo of a {a} with warm tones | a photo of a {b} with cold tones\n"
                            f"shape: a photo of a {a} with round edges | a photo of a {b} with sharp edges")
                else:
                    name = re.sub(r"^.*?(?:of an? |of |like |a )", "", question).rstrip("?.")
                    text = f"1. A {name} is easy to spot in photos. It has many features."
                counts = {"prompt_tokens": 10 if usage else None, "completion_tokens": 12 if usage else None}
                message = {"role": "assistant", "content": text}
                return json.dumps({"choices": [{"message": message}], "usage": counts}).encode()

            def _trickle(self, body):
                self._send(200, b"", {"Content-Length": str(len(body))})
                for byte in body:
                    time.sleep(0.05)
                    self.wfile.write(bytes([byte]))  # raises once the client has given up, which ends this

            def _leave(self):
                # counted out before the answer goes back, so the client's next request cannot overlap it
                if not getattr(self, "left", False):
                    self.left = True
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, body, headers=None):
                self._leave()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with server.lock:
                    server.statuses.append(code)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda request, address: None  # a client that timed out is expected here
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
