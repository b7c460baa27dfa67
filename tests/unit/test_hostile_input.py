"""Hostile and broken inputs end as a clear ImageError, never a crash. Local HTTP server only."""

from __future__ import annotations

import http.server
import io
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgembed.images.decode import decode_image
from imgembed.images.image_error import ImageError
from imgembed.images.sources import ImageSource, read_source, read_to_end
from imgembed.settings import load_settings


def png(size: tuple[int, int] = (20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok.png an image, /big.png 5,000 bytes with no Content-Length, /slow.png an answer that
    never comes, /drip.png a body a byte at a time, /redirect to /ok.png, /to-loopback to /ok.png on 127.0.0.1 (the server's
    ``loopback_port``); everything else 404. The server counts requests by path."""

    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append((self.path, self.headers.get("Host")))
        if self.path == "/ok.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/big.png":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the cap must hold while reading
            self.wfile.write(b"\0" * 5000)
        elif self.path == "/secret.png":  # a text, not an image, with a secret in it
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"user=admin password=hunter2 token=hunter2hunter2\n" * 3)
        elif self.path == "/leaky-error":  # an error whose reason phrase carries bytes
            self.send_response(500, "Server Error b'hunter2' \x01\x02")
            self.end_headers()
        elif self.path == "/slow.png":
            self.server.release.wait(60)
        elif self.path == "/drip.png":  # a byte at a time, each well within a read's timeout, for a minute
            self.send_response(200)
            self.end_headers()
            for _ in range(300):
                if self.server.release.wait(0.2):
                    break
                self.wfile.write(b"\0")
                self.wfile.flush()
        elif self.path in ("/redirect", "/to-loopback"):
            self.send_response(302)
            target = f"http://127.0.0.1:{self.server.server_address[1]}/ok.png" if self.path == "/to-loopback" else "/ok.png"
            self.send_header("Location", target)
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


class ImageServer(http.server.ThreadingHTTPServer):
    def __init__(self, address: str, port: int = 0) -> None:
        super().__init__((address, port), Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.shutdown()


PNG = png()
ALLOWED_NETWORK = "127.0.0.2/32"  # an image store on a private network the settings allow


@pytest.fixture
def servers() -> Iterator[tuple[ImageServer, ImageServer]]:
    """Two servers on one port: an allowed image store on 127.0.0.2, and 127.0.0.1, which is not
    allowed (the address an attacker would steer a worker to)."""
    for _ in range(20):
        store = ImageServer("127.0.0.2")
        try:
            loopback = ImageServer("127.0.0.1", store.server_address[1])
        except OSError:  # that port is taken on 127.0.0.1: another pair
            store.close()
            continue
        yield store, loopback
        store.close()
        loopback.close()
        return
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")


def fetch(url: str, **env: str) -> bytes:
    return read_source(ImageSource(uri=url), load_settings({"IMGEMBED_ALLOW_HTTP": "1", **env}))


def test_http_is_off_unless_enabled(servers: tuple[ImageServer, ImageServer]) -> None:
    store, _ = servers
    with pytest.raises(ImageError, match=re.escape("http(s) fetching is off")):
        read_source(ImageSource(uri=f"{store.url}/ok.png"), load_settings({}))
    assert store.requests == []


def test_private_addresses_are_refused_unless_allowed(servers: tuple[ImageServer, ImageServer]) -> None:
    store, loopback = servers
    with pytest.raises(ImageError, match="non-public address 127.0.0.1"):
        fetch(f"{loopback.url}/ok.png")
    with pytest.raises(ImageError, match="non-public address 127.0.0.1"):
        fetch(f"{loopback.url}/ok.png", IMGEMBED_HTTP_ALLOW_NETWORKS=ALLOWED_NETWORK)
    assert loopback.requests == []
    assert fetch(f"{loopback.url}/ok.png", IMGEMBED_HTTP_ALLOW_PRIVATE="1") == PNG
    assert fetch(f"{store.url}/ok.png", IMGEMBED_HTTP_ALLOW_NETWORKS=ALLOWED_NETWORK) == PNG
    assert fetch(f"{store.url}/redirect", IMGEMBED_HTTP_ALLOW_NETWORKS=ALLOWED_NETWORK) == PNG


def test_a_redirect_to_a_loopback_address_is_refused(servers: tuple[ImageServer, ImageServer]) -> None:
    store, loopback = servers
    with pytest.raises(ImageError, match="non-public address 127.0.0.1"):
        fetch(f"{store.url}/to-loopback", IMGEMBED_HTTP_ALLOW_NETWORKS=ALLOWED_NETWORK)
    assert [path for path, _ in store.requests] == ["/to-loopback"] and loopback.requests == []


def test_the_connection_goes_to_the_address_that_was_checked(
        servers: tuple[ImageServer, ImageServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name resolves to the allowed store when checked, and to 127.0.0.1 on
    every later look-up. The worker connects to what it checked, by name (Host header)."""
    store, loopback = servers
    port = store.server_address[1]
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["127.0.0.2"])

    def rebinding(host: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        if host == "images.test":
            host = next(answers, "127.0.0.1")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert fetch(f"http://images.test:{port}/ok.png", IMGEMBED_HTTP_ALLOW_NETWORKS=ALLOWED_NETWORK) == PNG
    assert store.requests == [("/ok.png", f"images.test:{port}")] and loopback.requests == []


def test_size_cap_timeout_and_http_errors(servers: tuple[ImageServer, ImageServer]) -> None:
    store, _ = servers
    allowed = {"IMGEMBED_HTTP_ALLOW_NETWORKS": ALLOWED_NETWORK}
    with pytest.raises(ImageError, match="over the cap"):
        fetch(f"{store.url}/big.png", IMGEMBED_MAX_IMAGE_BYTES="1000", **allowed)
    with pytest.raises(ImageError, match="timed out") as slow:
        fetch(f"{store.url}/slow.png", IMGEMBED_HTTP_TIMEOUT_SECONDS="0.5", **allowed)
    assert slow.value.retryable
    with pytest.raises(ImageError, match=r"timed out: over 1 s in all") as dripping:  # one deadline for it all
        fetch(f"{store.url}/drip.png", IMGEMBED_HTTP_TIMEOUT_SECONDS="1", **allowed)
    assert dripping.value.retryable
    with pytest.raises(ImageError, match="HTTP 404") as missing:
        fetch(f"{store.url}/nothing.png", **allowed)
    assert not missing.value.retryable


def test_fifo_device_and_svg(tmp_path: Path) -> None:
    settings = load_settings({})
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        read_source(ImageSource(uri=fifo.as_uri()), settings)
    with pytest.raises(ImageError, match="not a regular file"):
        read_source(ImageSource(uri="file:///dev/urandom"), settings)
    with pytest.raises(ImageError, match="SVG"):
        decode_image(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', settings)


def test_pixel_cap_refuses_bombs_below_pillows_own_limit() -> None:
    settings = load_settings({"IMGEMBED_MAX_PIXELS": "1000"})
    with pytest.raises(ImageError, match="over the cap of 1000"):
        decode_image(png((40, 40)), settings)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(png((100, 100)), settings)  # over twice the cap: Pillow refuses it itself
    assert decode_image(png((20, 20)), settings).size == (20, 20)


# What each EXIF orientation asks a viewer to do to the stored pixels, written from the EXIF
# specification with numpy (rows, columns, channels), not with Pillow's table.
UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,                                   # mirrored left to right
    3: lambda a: np.rot90(a, 2),                    # upside down
    4: np.flipud,                                   # mirrored top to bottom
    5: lambda a: a.transpose(1, 0, 2),              # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),                   # turn 90 degrees clockwise
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),                    # turn 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_images_are_upright_rgb(orientation: int) -> None:
    """EXIF orientation is applied (in place, without copying an upright image)."""
    stored = np.zeros((32, 48, 3), dtype=np.uint8)
    stored[..., 0] = np.linspace(0, 255, 48, dtype=np.uint8)[None, :]  # red grows left to right
    stored[..., 1] = np.linspace(0, 255, 32, dtype=np.uint8)[:, None]  # green grows top to bottom
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    decoded = decode_image(buffer.getvalue(), load_settings())
    assert decoded.mode == "RGB"
    assert decoded.size == ((32, 48) if orientation >= 5 else (48, 32))
    np.testing.assert_array_equal(np.asarray(decoded), UPRIGHT[orientation](stored))


class _Trickle(io.RawIOBase):
    """A file system whose read(2) returns at most 7 bytes (as network and FUSE ones may)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.data[self.position:self.position + min(size, 7)]
        self.position += len(chunk)
        return chunk


def test_short_reads_are_read_on_and_a_file_grown_past_the_cap_is_refused() -> None:
    data = png((30, 30))
    assert read_to_end(_Trickle(data), len(data), 10_000, Path("/images/a.png")) == data
    assert read_to_end(_Trickle(b""), 0, 100, Path("/images/empty.png")) == b""
    with pytest.raises(ImageError, match="grew past the cap"):  # measured at 10 bytes, then longer than the cap
        read_to_end(_Trickle(data), 10, len(data) - 1, Path("/images/a.png"))


def test_errors_never_quote_the_bytes_read(tmp_path: Path) -> None:
    """A path to a file that is not an image (a password file, an environment) fails with what it
    looks like, never with any of its bytes: failures are readable by more roles than the file."""
    secret = "root:x:0:0:S3CR3T-HASH-VALUE:/root:/bin/bash\n"
    settings = load_settings({})
    for name, content in (("passwd", secret.encode()), ("environ", b"\x00TOKEN=S3CR3T\x00" + bytes(range(256)))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ImageError) as raised:
            decode_image(read_source(ImageSource(uri=str(path)), settings), settings)
        message = str(raised.value)
        assert "not a recognised image format" in message
        assert "S3CR3T" not in message and "root" not in message and content[:4].hex() not in message.replace(" ", "")


def test_errors_never_quote_the_files_bytes(tmp_path: Path) -> None:
    """A decoder's message quotes what it found; the failure that more roles read does not."""
    settings = load_settings({})
    for secret in (b"P6 hunter2\n", b"P6\n2 2\nhunter2\n", b"\x89PNG\r\n\x1a\nhunter2-hunter2-hunter2"):
        with pytest.raises(ImageError) as failed:
            decode_image(secret, settings)
        assert "hunter2" not in str(failed.value), str(failed.value)


def test_a_readers_path_is_read_only_under_allowed_roots(tmp_path: Path) -> None:
    """A location a reader gives (search_image_at) is refused while IMGEMBED_ALLOWED_ROOTS is unset,
    with one answer whether the file exists or not; under the roots it is read."""
    (tmp_path / "photo.png").write_bytes(PNG)
    answers = set()
    for name in ("photo.png", "missing.png"):
        with pytest.raises(ImageError, match="outside allowed roots") as refused:
            read_source(ImageSource(uri=str(tmp_path / name), from_reader=True), load_settings({}))
        answers.add(str(refused.value).replace(name, "NAME"))
    assert len(answers) == 1
    assert read_source(ImageSource(uri=str(tmp_path / "photo.png")), load_settings({})) == PNG  # the application's own
    inside = load_settings({"IMGEMBED_ALLOWED_ROOTS": str(tmp_path)})
    assert read_source(ImageSource(uri=(tmp_path / "photo.png").as_uri(), from_reader=True), inside) == PNG


def test_http_errors_never_quote_what_the_server_sent(servers: tuple[ImageServer, ImageServer]) -> None:
    store, _ = servers
    allowed = {"IMGEMBED_HTTP_ALLOW_NETWORKS": ALLOWED_NETWORK}
    body = fetch(f"{store.url}/secret.png", **allowed)
    with pytest.raises(ImageError, match=r"not an image: .*looks like text") as not_an_image:
        decode_image(body, load_settings({}))
    with pytest.raises(ImageError, match="HTTP 500") as server_error:
        fetch(f"{store.url}/leaky-error", **allowed)
    for failure in (not_an_image.value, server_error.value):
        assert "hunter2" not in str(failure) and "\x01" not in str(failure), str(failure)
