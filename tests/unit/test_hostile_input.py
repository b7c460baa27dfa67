"""Hostile and broken inputs end as a clear ImageError, never a crash. Local HTTP server only."""

from __future__ import annotations

import http.server
import io
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from imgembed.settings import load_settings
from imgembed.worker.decode import decode_image
from imgembed.worker.fetch_http import _CheckedRedirects
from imgembed.worker.image_error import ImageError
from imgembed.worker.sources import ImageSource, read_source, read_to_end


def png(size: tuple[int, int] = (20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    body = png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/big.png":
                self.send_response(200)
                self.end_headers()  # no Content-Length: the cap must hold while reading
                self.wfile.write(b"\0" * 5000)
            elif self.path == "/slow.png":
                time.sleep(2)
                self.send_response(200)
                self.end_headers()
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/ok.png")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(url: str, **env: str) -> bytes:
    return read_source(ImageSource(uri=url), load_settings({"IMGEMBED_ALLOW_HTTP": "1", **env}))


def test_http_is_off_unless_enabled(server: str) -> None:
    with pytest.raises(ImageError, match=re.escape("http(s) fetching is off")):
        read_source(ImageSource(uri=f"{server}/ok.png"), load_settings({}))


def test_private_addresses_are_refused_unless_allowed(server: str) -> None:
    with pytest.raises(ImageError, match="non-public address 127.0.0.1"):
        fetch(f"{server}/ok.png")
    assert fetch(f"{server}/ok.png", IMGEMBED_HTTP_ALLOW_PRIVATE="1") == png()
    assert fetch(f"{server}/redirect", IMGEMBED_HTTP_ALLOW_PRIVATE="1") == png()


def test_redirects_are_checked_again() -> None:
    handler = _CheckedRedirects(load_settings({"IMGEMBED_ALLOW_HTTP": "1"}))
    with pytest.raises(ImageError, match="non-public address"):
        handler.redirect_request(None, None, 302, "Found", {}, "http://169.254.169.254/latest/meta-data")


def test_size_cap_timeout_and_http_errors(server: str) -> None:
    private = {"IMGEMBED_HTTP_ALLOW_PRIVATE": "1"}
    with pytest.raises(ImageError, match="over the cap"):
        fetch(f"{server}/big.png", IMGEMBED_MAX_IMAGE_BYTES="1000", **private)
    with pytest.raises(ImageError, match="timed out") as slow:
        fetch(f"{server}/slow.png", IMGEMBED_HTTP_TIMEOUT_SECONDS="0.5", **private)
    assert slow.value.retryable
    with pytest.raises(ImageError, match="HTTP 404") as missing:
        fetch(f"{server}/nothing.png", **private)
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


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_images_are_upright_rgb(orientation: int) -> None:
    """EXIF orientation is applied (in place, without copying an upright image)."""
    pixels = Image.linear_gradient("L").resize((48, 32)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", exif=exif, quality=95)
    data = buffer.getvalue()
    decoded = decode_image(data, load_settings())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert decoded.mode == "RGB"
    assert decoded.size == expected.size == ((32, 48) if orientation >= 5 else (48, 32))
    assert decoded.tobytes() == expected.convert("RGB").tobytes()


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
