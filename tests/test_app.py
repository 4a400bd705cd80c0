"""The web app without a browser: upload checks, the widgets' state after uploads and
threshold moves, downloads equal to predict's outputs, the notebook it serves, its CLI."""

from __future__ import annotations

import base64
import datetime
import functools
import io
import re
import socket
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from engine_helpers import save_tiny_checkpoint
from PIL import Image

from egeunet import app as app_module
from egeunet.app import (
    FOLDER_TAG,
    LesionApp,
    app_notebook,
    inspect_upload,
    is_loopback,
    lesion_app,
    voila_options,
)
from egeunet.cli import main as cli_main
from egeunet.lesion import LesionExplorer, Segmenter
from egeunet.predict import predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "tiny.pt"
    save_tiny_checkpoint(path)
    return path


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def png_file(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: PIL writes neither 16-bit RGB nor a header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def rgb_png_16bit(height: int, width: int) -> bytes:
    rows = np.random.default_rng(2).integers(0, 65536, (height, width, 3)).astype(">u2")
    return png_file(width, height, 16, 2, b"".join(b"\x00" + row.tobytes() for row in rows))


@functools.cache
def uploads() -> dict[str, bytes]:
    """Good, convertible and bad files, by name."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    grey16 = Image.fromarray(rng.integers(0, 65536, (30, 40)).astype(np.uint16))
    return {
        "photo.png": encoded(rgb, "PNG"),
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "grey16.png": encoded(grey16, "PNG"),
        "rgb16.png": rgb_png_16bit(30, 40),
        "animated.gif": encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "notes.txt": b"not an image at all",
        "truncated.jpg": encoded(rgb, "JPEG")[:400],
        "truncated.png": encoded(rgb, "PNG")[:600],
        "huge.png": png_file(20000, 20000, 1, 0, b""),  # a header of 400 megapixels
        "empty.png": b"",
    }


def test_inspect_upload_refuses_and_notes(monkeypatch):
    files = uploads()
    assert inspect_upload("photo.png", files["photo.png"]) == []
    assert inspect_upload("cmyk.jpg", files["cmyk.jpg"]) == ["CMYK colours converted to RGB"]
    assert inspect_upload("grey16.png", files["grey16.png"]) == [
        "16-bit grey levels scaled to 8 bits"
    ]
    assert inspect_upload("animated.gif", files["animated.gif"]) == [
        "3 frames: only the first was segmented"
    ]
    refused = {
        "notes.txt": "not an image format PIL recognises",
        "huge.png": "megapixels; the app takes up to 50",
        "empty.png": "the file is empty",
        "truncated.jpg": "cannot read image truncated.jpg",
    }
    for name, message in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            inspect_upload(name, files[name])
    monkeypatch.setattr(app_module, "MAX_UPLOAD_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"photo\.png: 70 x 50 pixels, more than the app takes"):
        inspect_upload("photo.png", files["photo.png"])
    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(ValueError, match=r"photo\.png: 0 MiB, more than the app takes"):
        inspect_upload("photo.png", files["photo.png"])


def link_payload(html_text: str, css_class: str) -> tuple[str, bytes]:
    """(download file name, bytes) of the data: link with ``css_class``."""
    found = re.search(
        rf'class="{css_class}" download="([^"]+)" href="data:[^;]+;base64,([^"]+)"', html_text
    )
    assert found, html_text[:300]
    return found.group(1), base64.b64decode(found.group(2))


def test_uploads_thresholds_and_downloads(checkpoint, tmp_path):
    app = lesion_app(checkpoint, threshold=0.5, pixel_size_mm=0.0, device="cpu")
    files = uploads()
    kept = app.add_files(list(files.items()))
    # Every readable file is segmented (converted where needed), every other one named.
    assert kept == ["photo.png", "cmyk.jpg", "grey16.png", "rgb16.png", "animated.gif"]
    messages = app.messages.value
    for name in ("notes.txt", "truncated.jpg", "truncated.png", "huge.png", "empty.png"):
        assert f"cannot read image {name}" in messages
    assert "cmyk.jpg: CMYK colours converted to RGB" in messages
    assert app.explorer.current == "animated.gif" and app.choice.value == "animated.gif"

    # The same name again is kept beside the first; the page shows it.
    assert app.add_files([("photo.png", files["photo.png"])]) == ["photo-1.png"]
    assert app.messages.value == ""
    app.choice.value = "photo.png"
    assert app.explorer.current == "photo.png"
    assert Image.open(io.BytesIO(app.overlay.value)).size == (70, 50)
    assert Image.open(io.BytesIO(app.mask.value)).size == (70, 50)

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "photo.png").write_bytes(files["photo.png"])
    areas = []
    for threshold in (0.3, 0.7):
        app.threshold.value = threshold
        name, mask_png = link_payload(app.downloads.value, "egeunet-download-mask")
        assert name == "photo_mask.png"
        predict(checkpoint, tmp_path / "in", tmp_path / f"out{threshold}", threshold=threshold)
        expected = (tmp_path / f"out{threshold}" / "photo_mask.png").read_bytes()
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(mask_png))),
            np.asarray(Image.open(io.BytesIO(expected))),
        )
        pixels = int((np.asarray(Image.open(io.BytesIO(mask_png))) > 0).sum())
        assert (
            f"{pixels:,} of 3,500 pixels" in app.area.value and f"{threshold:.2f}" in app.area.value
        )
        areas.append(pixels)
    assert areas[0] > areas[1] > 0  # the threshold moves the mask, and the mask is not empty

    app.pixel_size.value = 0.1
    csv_name, csv = link_payload(app.downloads.value, "egeunet-download-csv")
    table = pd.read_csv(io.BytesIO(csv)).set_index("image")
    assert csv_name == "lesion_areas.csv" and len(table) == 6
    assert table.loc["photo.png", "lesion_pixels"] == areas[1]
    assert table.loc["photo.png", "lesion_area_mm2"] == pytest.approx(areas[1] * 0.01)
    assert table.loc["photo.png", "threshold"] == 0.7
    assert table.loc["rgb16.png", "width"] == 40 and table.loc["rgb16.png", "height"] == 30
    assert "mm²" in app.area.value


def test_large_images_are_shown_small_and_downloaded_whole(checkpoint):
    app = lesion_app(checkpoint, device="cpu")
    big = Image.fromarray(np.random.default_rng(4).integers(0, 256, (900, 1300, 3), np.uint8))
    app.add_files([("big.png", encoded(big, "PNG"))])
    assert Image.open(io.BytesIO(app.overlay.value)).size == (640, 443)
    _, mask_png = link_payload(app.downloads.value, "egeunet-download-mask")
    assert Image.open(io.BytesIO(mask_png)).size == (1300, 900)


def test_the_upload_widget_feeds_the_app(checkpoint):
    app = LesionApp(LesionExplorer(Segmenter(checkpoint, "cpu")))
    content = uploads()["photo.png"]
    app.upload.value = (
        {
            "name": "dropped.png",
            "type": "image/png",
            "size": len(content),
            "content": memoryview(content),
            "last_modified": datetime.datetime.now(datetime.UTC),
        },
    )
    assert list(app.explorer.images) == ["dropped.png"]
    assert app.upload.value == ()  # consumed: memory freed, the same file can come again
    assert "dropped.png" in app.area.value


def test_served_notebook_is_the_inference_notebook_without_the_folder_part(checkpoint):
    notebook = app_notebook(checkpoint, threshold=0.4, pixel_size_mm=0.02)
    assert not [c for c in notebook.cells if FOLDER_TAG in c.metadata.tags]
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.tags]
    assert len(injected) == 1
    source = injected[0].source
    assert f'checkpoint = "{checkpoint.resolve()}"' in source
    assert 'input_path = ""' in source and "threshold = 0.4" in source
    assert "interactive = True" in source and 'device = "cpu"' in source
    assert any("lesion_app(" in c.source for c in notebook.cells)


def test_app_command_fails_clearly(checkpoint, capsys, monkeypatch, tmp_path):
    from egeunet import checkpoint as checkpoints

    monkeypatch.setattr(checkpoints, "WEIGHTS_FOLDER", tmp_path)  # no shipped weights here
    assert cli_main(["app"]) == 2  # the default, shipped weights, is not installed
    assert "the shipped weights are not installed" in capsys.readouterr().err
    assert cli_main(["app", "--weights", str(checkpoint), "--threshold", "1.5"]) == 2
    assert "--threshold must lie strictly between 0 and 1" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_main(["app", "--weights", str(checkpoint), "--port", str(port)]) == 2
    assert f"--port {port} on 127.0.0.1: cannot listen there" in capsys.readouterr().err


def test_other_hosts_than_loopback_need_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    options, query = voila_options("127.0.0.1", 8866)
    assert query == "" and not [o for o in options if o.startswith("--token")]
    assert "--Voila.ip=127.0.0.1" in options and "--strip_sources=True" in options
    options, query = voila_options("0.0.0.0", 8866)
    token = query.removeprefix("?token=")
    assert len(token) >= 32 and f"--token={token}" in options
