"""An OpenAI-compatible speech server: `python serve.py [--model ...] [--port 8000] [--batch 4]`, then
http://127.0.0.1:8000/ for the live voice chat page, or any OpenAI client at http://127.0.0.1:8000/v1.

    POST /v1/chat/completions      text and input_audio in; text, or text and speech out; streamed or not
    POST /v1/audio/speech          TTS: wav, pcm or flac, streamed as it is decoded (or as server-sent events)
    POST /v1/audio/transcriptions  ASR of a file of any length: json, text, srt, vtt, verbose_json, or streamed
    GET  /v1/models, /health, /    the model, the server's state, the page (web/)

One model and one decoding thread (engine.py): every running request holds a cache row and one decode step serves
them all; requests beyond the rows wait their turn. Standard library only (http.server): here the HTTP plumbing
(routing, the API key, reading the body, writing whole or chunked answers, noticing a client gone) and the command
line; endpoints.py does each route's work, api.py reads and writes the OpenAI shapes. Bad input gets a 4xx with
OpenAI's error body, and the server goes on.
"""

import argparse
import hmac
import json
import select
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import api
import options
import run
import tasks
from api import APIError, bad
from batch import Sequence
from endpoints import ROUTES, Endpoints
from engine import Engine

DRAIN_LIMIT = 256 << 20  # an oversized body is read and dropped up to this size (so the client sees the 413)


class ClientGone(Exception):
    """The client closed the connection, or stopped taking the answer."""


class Handler(Endpoints, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streamed answers use chunked transfer encoding
    server: "Server"

    def setup(self):
        self.timeout = self.server.timeout  # a client that stalls (sending its request, or taking the answer)
        super().setup()

    def log_message(self, fmt, *args):  # one line per request on stderr, as http.server does, without the noise
        if self.server.verbose:
            super().log_message(fmt, *args)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def _route(self, method: str):
        path, self.streaming = self.path.split("?")[0], False
        # a body left unread would be taken for the next request on this connection: refused unread, it closes
        self.unread = method != "GET" and (self.headers.get("Content-Length", "0").strip() not in ("", "0")
                                           or "Transfer-Encoding" in self.headers)
        try:
            if path not in ROUTES:
                raise APIError(404, f"no route {path} (see /v1/models, /v1/chat/completions, /v1/audio/speech, "
                                    f"/v1/audio/transcriptions)", code="unknown_url")
            allowed, name = ROUTES[path]
            if allowed != method:
                raise APIError(405, f"{path} takes {allowed}, not {method}", code="method_not_allowed")
            if path.startswith("/v1/"):
                self._check_key()
            getattr(self, "_" + name)(self._body() if method == "POST" else b"")
        except (ClientGone, ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001  (a bug must not take the server down: a 500, and on we go)
            if not isinstance(e, APIError):
                self.log_error("%s", repr(e))
                e = APIError(500, f"internal error: {tasks.one_line(e)}", kind="server_error")
            if self.streaming:  # the status line is sent: all that is left is to end the connection
                self.close_connection = True
            else:
                self.close_connection = self.close_connection or self.unread
                self._json(e.body(), e.status)

    def _check_key(self):
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "a wrong or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise APIError(411, "send the body with a Content-Length, not chunked")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise bad("Content-Length is not a number") from None
        if n > self.server.max_body:
            self.close_connection = True
            if n <= DRAIN_LIMIT:
                self.rfile.read(n)
            raise APIError(413, f"the body is {n} bytes, more than the limit of {self.server.max_body} "
                                f"(serve.py --max-body-mb)", code="request_too_large")
        body = self.rfile.read(n)
        if len(body) < n:
            raise ClientGone()
        self.unread = False
        return body

    # -- writing --

    def _json(self, obj, status: int = 200):
        self._send(json.dumps(obj).encode(), "application/json", status)

    def _send(self, data: bytes, content_type: str, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str):
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _chunk(self, data: bytes):
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _event(self, obj):
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _gone(self) -> bool:
        """Whether the client has closed its side (checked at every step of its answer)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _items(self, seq: Sequence, vocoder=None):
        """Submit `seq` now (a 400 if it cannot fit the context): its items, with their sound when given a vocoder
        (sound.respond's stream), as they come."""
        try:
            return self._watch(seq, self.server.engine.submit(seq, vocoder, run.DECODE_FRAMES))
        except ValueError as e:
            raise bad(tasks.one_line(e), code="context_length_exceeded") from None

    def _watch(self, seq: Sequence, items):
        """`items` as they come; a client that goes away cancels its sequence (its row is freed at the next step)."""
        try:
            for event in items:
                if self._gone():
                    raise ClientGone()
                yield event
        finally:
            if seq.finish is None:
                seq.cancel()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model, vocoder, args):
        super().__init__(address, Handler)
        self.model, self.vocoder, self.engine = model, vocoder, Engine(model, args.batch).start()
        self.answers = api.Answers()
        self.api_key, self.max_body = args.api_key, int(args.max_body_mb * 2**20)
        self.model_name, self.quantize, self.max_new_tokens = args.model, args.quantize, args.max_new_tokens
        self.vocoder_name = type(vocoder).__name__.lower().replace("detokenizer", "lfm2")
        self.sampling = {task: options.sampling(args, task) for task in tasks.TASKS}
        self.verbose, self.timeout = args.verbose, args.timeout


def parse_args(argv=None) -> argparse.Namespace:
    p = options.Parser(description="LFM2-Audio-1.5B as an OpenAI-compatible speech server, with a live voice page.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--batch", type=int, default=4,
                   help="cache rows decoded together, each a running request or a conversation kept for the next "
                        "turn (default 4)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every /v1 route")
    p.add_argument("--max-body-mb", type=float, default=25, help="largest request body in MB (default 25)")
    p.add_argument("--timeout", type=float, default=60,
                   help="seconds a client may stall, sending its request or taking the answer (default 60)")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")
    options.model_options(p)
    args = p.parse_args(argv)
    if args.batch < 1 or args.max_new_tokens < 1 or args.context < 2 or args.max_body_mb <= 0 or args.timeout <= 0:
        p.error("--batch and --max-new-tokens must be >= 1, --context >= 2, --max-body-mb and --timeout > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        t0 = time.perf_counter()
        model, vocoder = tasks.load(args.model, args.device, args.dtype, args.quantize, args.compile, args.context,
                                    args.vocoder, sampling=options.sampling(args, "chat"))
        server = Server((args.host, args.port), model, vocoder, args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {tasks.one_line(e)}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"ready in {time.perf_counter() - t0:.1f} s ({model.setup}, {args.batch} rows): http://{host}:{port}/ "
          f"(the voice page), http://{host}:{port}/v1 (the API)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        server.engine.stop()  # the step under way ends first: no thread is inside the model at exit
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
