"""A minimal RTSP relay for tests: ffmpeg publishes a looping video into it, players read it back.

Debian's ffmpeg can publish RTSP (ANNOUNCE + RECORD) but cannot serve it to a player, so this
relay stands in for a camera or a media server. TCP-interleaved transport only: the publisher's
SDP is handed to every DESCRIBE, and each ``$``-framed RTP/RTCP packet the publisher sends on a
track's channels is copied to every playing client on that client's channels for the track.
Standard library only.

    python tests/rtsp_relay.py --port 8554 --video scenes.mp4   # serves rtsp://127.0.0.1:8554/live

The script starts the relay, then ffmpeg publishing ``--video`` in a loop into it; it exits when
ffmpeg does and stops ffmpeg on SIGTERM/SIGINT. Tests run it in its own process group and kill
the group to simulate a server crash.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import NamedTuple
from urllib.parse import urlsplit

SEND_TIMEOUT_S = 5.0  # a player that stops reading for this long is dropped, not waited for


class Request(NamedTuple):
    method: str
    url: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


class Packet(NamedTuple):
    """An interleaved RTP or RTCP packet: ``$``, channel, 16-bit length, payload."""

    channel: int
    payload: bytes


class Connection:
    """One RTSP client socket: requests in, responses and interleaved packets out."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.send_lock = threading.Lock()  # responses and forwarded packets must not interleave
        self.channels: dict[int, int] = {}  # track index -> first interleaved channel (RTP)

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def read_message(self) -> Request | Packet | None:
        """The next request or interleaved packet; None when the client hangs up."""
        first = self.reader.read(1)
        if not first:
            return None
        if first == b"$":
            header = self.reader.read(3)
            if len(header) < 3:
                return None
            channel, length = header[0], struct.unpack(">H", header[1:])[0]
            payload = self.reader.read(length)
            return Packet(channel, payload) if len(payload) == length else None
        method, url, _ = (first + self.reader.readline()).decode("utf-8", "replace").split(" ", 2)
        headers = {}
        while (line := self.reader.readline().decode("utf-8", "replace").strip()):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers.get("content-length", 0)))
        return Request(method, url, headers, body)

    def respond(self, cseq: str, status: str = "200 OK", headers: dict[str, str] | None = None,
                body: bytes = b"") -> None:
        lines = [f"RTSP/1.0 {status}", f"CSeq: {cseq}", "Server: edgecap-test-relay"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


class Relay:
    """Accepts one publisher per path and any number of players."""

    def __init__(self, port: int):
        self.server = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR: quick restarts
        self.lock = threading.Lock()
        self.sdp: dict[str, str] = {}  # path -> the publisher's SDP
        self.players: dict[str, list[Connection]] = {}  # path -> clients that sent PLAY

    def serve_forever(self) -> None:
        while True:
            client, _ = self.server.accept()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Reads block (a publisher may pause); sends time out, so one stuck player cannot
            # stall the publisher's thread that forwards to everyone.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                              struct.pack("ll", int(SEND_TIMEOUT_S), 0))
            threading.Thread(target=self.handle, args=(Connection(client),), daemon=True).start()

    def handle(self, conn: Connection) -> None:
        path, publishing, playing = "", False, False
        try:
            while (message := conn.read_message()) is not None:
                if isinstance(message, Packet):
                    if publishing:
                        self.forward(path, conn, message)
                    continue  # players' RTCP receiver reports are dropped
                method, url, headers, body = message
                cseq = headers.get("cseq", "0")
                if method == "ANNOUNCE":
                    path = stream_path(url)
                    with self.lock:
                        self.sdp[path] = body.decode()
                    publishing = True
                    conn.respond(cseq)
                elif method == "DESCRIBE":
                    path = stream_path(url)
                    with self.lock:
                        sdp = self.sdp.get(path)
                    if sdp is None:
                        conn.respond(cseq, "404 Not Found")
                        continue
                    conn.respond(cseq, headers={"Content-Base": url.rstrip("/") + "/",
                                                "Content-Type": "application/sdp"},
                                 body=sdp.encode())
                elif method == "SETUP":
                    self.setup(conn, cseq, url, headers.get("transport", ""))
                elif method == "PLAY":
                    with self.lock:
                        self.players.setdefault(path, []).append(conn)
                    playing = True
                    conn.respond(cseq, headers={"Session": "1", "Range": "npt=0.000-"})
                elif method in ("OPTIONS", "RECORD", "GET_PARAMETER", "SET_PARAMETER"):
                    conn.respond(cseq, headers={
                        "Session": "1",
                        "Public": "OPTIONS, DESCRIBE, ANNOUNCE, SETUP, PLAY, RECORD, TEARDOWN"})
                elif method == "TEARDOWN":
                    conn.respond(cseq, headers={"Session": "1"})
                    break
                else:
                    conn.respond(cseq, "501 Not Implemented")
        except (OSError, ValueError):
            pass  # a client vanished or sent garbage: drop it
        finally:
            with self.lock:
                if publishing:
                    self.sdp.pop(path, None)
                if playing and conn in self.players.get(path, []):
                    self.players[path].remove(conn)
                players = self.players.pop(path, []) if publishing else []
            for player in players:  # players of a vanished stream are cut off, as a server would
                disconnect(player)
            conn.reader.close()
            conn.sock.close()

    def setup(self, conn: Connection, cseq: str, url: str, transport: str) -> None:
        match = re.search(r"interleaved=(\d+)-(\d+)", transport)
        if "TCP" not in transport or not match:
            conn.respond(cseq, "461 Unsupported Transport")
            return
        path, track = stream_path(url, with_track=True)
        with self.lock:
            sdp = self.sdp.get(path, "")
        controls = re.findall(r"^a=control:(\S+)", sdp, re.MULTILINE)
        if track not in controls:
            conn.respond(cseq, "404 Not Found")
            return
        conn.channels[controls.index(track)] = int(match.group(1))
        conn.respond(cseq, headers={"Session": "1", "Transport": transport})

    def forward(self, path: str, publisher: Connection, packet: Packet) -> None:
        """Copy one publisher packet to each player, on the player's channel for that track."""
        for track, first in publisher.channels.items():
            if packet.channel in (first, first + 1):
                offset = packet.channel - first  # 0: RTP, 1: RTCP
                break
        else:
            return
        with self.lock:
            players = list(self.players.get(path, []))
        for player in players:
            if track not in player.channels:
                continue
            header = struct.pack(">cBH", b"$", player.channels[track] + offset, len(packet.payload))
            try:
                player.send(header + packet.payload)
            except OSError:
                disconnect(player)  # its own thread sees EOF and cleans up


def disconnect(conn: Connection) -> None:
    """Hang up on a client: its thread, woken with EOF if blocked reading, closes the socket."""
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def stream_path(url: str, with_track: bool = False):
    """``rtsp://host/live/streamid=0`` -> ``"live"`` (and ``"streamid=0"`` with_track)."""
    path = urlsplit(url).path.strip("/")
    if not with_track:
        return path
    base, _, track = path.rpartition("/")
    return base, track


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--video", required=True, help="file to publish in a loop")
    parser.add_argument("--path", default="live")
    args = parser.parse_args(argv)

    relay = Relay(args.port)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    # MJPEG over RTP (RFC 2435): every frame is a key frame, so a player can join at any moment.
    # The RFC wants the standard Huffman tables and both quantization tables in each frame;
    # ffmpeg's defaults (optimal tables, one shared matrix) make players drop every frame.
    publisher = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", args.video,
         "-an", "-c:v", "mjpeg", "-pix_fmt", "yuvj420p", "-q:v", "5",
         "-huffman", "default", "-force_duplicated_matrix", "1",
         "-f", "rtsp", "-rtsp_transport", "tcp", f"rtsp://127.0.0.1:{args.port}/{args.path}"])

    def stop(*_):
        publisher.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return publisher.wait()
    finally:
        publisher.kill()


if __name__ == "__main__":
    sys.exit(main())
