"""``egeunet app``: the lesion segmenter as a web page, served by Voilà from 05_inference.

The page lets a user upload one or several images, shows each image's overlay and mask
side by side, follows a threshold slider, gives the lesion area (pixels, share of the
image, mm² when the side of a pixel is known) and offers the mask PNG and a CSV of areas
for download. The same widgets run in JupyterLab (05_inference with ``interactive=True``).

* :func:`inspect_upload` refuses what the app does not take (empty, over
  :data:`MAX_UPLOAD_BYTES`, over :data:`MAX_UPLOAD_PIXELS`, unreadable) with a one-line
  message, and notes what is converted (CMYK, 16-bit, several frames);
* :class:`LesionApp` builds the widgets on a :class:`~egeunet.lesion.LesionExplorer`;
  its :meth:`~LesionApp.add_files` is what an upload calls, so it is tested without a
  browser;
* :func:`serve` writes a copy of 05_inference with the app's parameters (cells tagged
  ``folder``, which segment a folder, left out) and serves it with Voilà: code cells
  hidden, on 127.0.0.1 unless told otherwise.

Masks are computed exactly as ``egeunet predict`` computes them (the same decoding,
resizing and model), so a downloaded mask equals predict's ``<name>_mask.png``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import ipaddress
import os
import secrets
import socket
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from egeunet.checkpoint import (
    DEFAULT_SHIPPED_WEIGHTS,
    SHIPPED_WEIGHTS,
    load_model,
    resolve_weights,
)
from egeunet.data.prepare import DECODE_ERRORS, WIDE_GREY_MODES, image_error
from egeunet.fileio import write_text_atomic
from egeunet.metrics import THRESHOLD
from egeunet.overlay import PREDICTION_COLOUR, overlay
from egeunet.predict import OUTPUT_SUFFIXES, encode_png, mask_pixels

if TYPE_CHECKING:  # the widgets' modules (pandas, matplotlib, nbformat) load when used: the
    # command line starts without them
    import nbformat

    from egeunet.lesion import LesionExplorer

MAX_UPLOAD_BYTES = 50 * 2**20
MAX_UPLOAD_PIXELS = 50_000_000
DISPLAY_SIDE = 640  # longest side of the pictures shown in the page (downloads: full size)
WEBSOCKET_MAX_MESSAGE_BYTES = 2**30  # one upload of several files is one message
# The page loads nothing from elsewhere (Voilà's template links an icon font on a CDN):
# it works offline, and a user's images and visits reach no other server.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self' data: blob:",
        "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
        "style-src 'self' 'unsafe-inline'",
        "connect-src 'self'",
        "frame-ancestors 'self'",
    ]
)
DEFAULT_PORT = 8866
DEFAULT_WEIGHTS = DEFAULT_SHIPPED_WEIGHTS
APP_NOTEBOOK = "05_inference.ipynb"
FOLDER_TAG = "folder"
LINK_STYLE = "color: var(--jp-content-link-color, #1565c0); text-decoration: underline"
AREAS_FILE = "lesion_areas.csv"


# --- Uploads -----------------------------------------------------------------------------


def inspect_upload(name: str, content: bytes) -> list[str]:
    """Notes on an upload the app segments after converting it, e.g. ``["CMYK colours
    converted to RGB"]``; ValueError naming the file when the app refuses it (empty, too
    many bytes or pixels, not an image). Reads the header only; decoding comes later."""
    if not content:
        raise ValueError(f"cannot read image {name}: the file is empty")
    if len(content) > MAX_UPLOAD_BYTES:
        raise ValueError(
            f"cannot read image {name}: {len(content) / 2**20:.0f} MiB, more than the app "
            f"takes ({MAX_UPLOAD_BYTES // 2**20} MiB)"
        )
    try:
        with warnings.catch_warnings():  # the pixel limit below is stricter than PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                width, height = image.size
                mode, frames = image.mode, getattr(image, "n_frames", 1)
    except Image.DecompressionBombError:
        raise ValueError(
            f"cannot read image {name}: more than {Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} "
            f"megapixels; the app takes up to {MAX_UPLOAD_PIXELS / 1e6:.0f}"
        ) from None
    except DECODE_ERRORS as error:
        raise image_error(name, error) from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise ValueError(
            f"cannot read image {name}: {width} x {height} pixels, more than the app takes "
            f"({MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels)"
        )
    notes = []
    if mode == "CMYK":
        notes.append("CMYK colours converted to RGB")
    if mode in WIDE_GREY_MODES:
        notes.append("16-bit grey levels scaled to 8 bits")
    if frames > 1:
        notes.append(f"{frames} frames: only the first was segmented")
    return notes


def display_pictures(image: np.ndarray, mask: np.ndarray) -> tuple[bytes, bytes]:
    """PNGs of the overlay and the mask, at most :data:`DISPLAY_SIDE` pixels on a side."""
    height, width = mask.shape
    scale = min(1.0, DISPLAY_SIDE / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask_pixels(mask)).resize(size, Image.NEAREST)) > 0
    return encode_png(overlay(image, mask, PREDICTION_COLOUR)), encode_png(mask_pixels(mask))


def download_link(data: bytes, filename: str, mime: str, label: str, css_class: str) -> str:
    """An HTML link that downloads ``data`` as ``filename`` (a data: URL, no server)."""
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<a class="{css_class}" download="{html.escape(filename)}" '
        f'href="data:{mime};base64,{encoded}" style="{LINK_STYLE}">{html.escape(label)}</a>'
    )


def mask_filename(image_name: str) -> str:
    """``photo.jpg`` -> ``photo_mask.png``, as predict names masks."""
    return Path(image_name).stem + OUTPUT_SUFFIXES["mask"]


# --- Widgets -----------------------------------------------------------------------------


class LesionApp:
    """The page's widgets on a :class:`~egeunet.lesion.LesionExplorer` (``.widget``).

    CSS classes name the parts a test or a style sheet looks for: ``egeunet-upload``,
    ``egeunet-threshold``, ``egeunet-pixel-size``, ``egeunet-choice``, ``egeunet-overlay``,
    ``egeunet-mask``, ``egeunet-messages``, ``egeunet-area``, ``egeunet-downloads`` (links
    ``egeunet-download-mask`` and ``egeunet-download-csv``) and ``egeunet-table``.
    """

    def __init__(self, explorer: LesionExplorer) -> None:
        import ipywidgets as widgets

        self.explorer = explorer
        self.upload = widgets.FileUpload(
            accept="image/*", multiple=True, description="Upload images"
        )
        self.threshold = widgets.FloatSlider(
            value=explorer.threshold,
            min=0.01,
            max=0.99,
            step=0.01,
            readout_format=".2f",
            continuous_update=False,
            description="threshold",
        )
        self.pixel_size = widgets.BoundedFloatText(
            value=explorer.pixel_size_mm,
            min=0.0,
            max=1000.0,
            step=0.001,
            description="pixel size (mm)",
            tooltip="side of one pixel in millimetres, for areas in mm²; 0 if unknown",
            style={"description_width": "initial"},
        )
        self.choice = widgets.Dropdown(options=[], description="image")
        self.overlay = widgets.Image(format="png")
        self.mask = widgets.Image(format="png")
        self.messages = widgets.HTML()
        self.area = widgets.HTML("<p>Upload one or several images to segment them.</p>")
        self.downloads = widgets.HTML()
        self.table = widgets.HTML()
        picture_layout = widgets.Layout(max_width="48%")
        self.pictures = widgets.HBox(
            [
                widgets.VBox(
                    [widgets.HTML("<b>overlay</b> (lesion in red)"), self.overlay],
                    layout=picture_layout,
                ),
                widgets.VBox([widgets.HTML("<b>mask</b>"), self.mask], layout=picture_layout),
            ]
        )
        for name in ("upload", "threshold", "pixel_size", "choice", "overlay", "mask"):
            getattr(self, name).add_class(f"egeunet-{name.replace('_', '-')}")
        for name in ("messages", "area", "downloads", "table"):
            getattr(self, name).add_class(f"egeunet-{name}")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.upload, self.threshold, self.pixel_size]),
                self.messages,
                self.choice,
                self.area,
                self.pictures,
                self.downloads,
                self.table,
            ]
        )
        self.upload.observe(self._on_upload, names="value")
        self.threshold.observe(self._on_setting, names="value")
        self.pixel_size.observe(self._on_setting, names="value")
        self.choice.observe(self._on_choice, names="value")
        self.render()

    def add_files(self, files: Sequence[tuple[str, bytes]]) -> list[str]:
        """Segment uploaded ``(name, content)`` pairs; the page says what was refused or
        converted, and shows the last image segmented. Returns the names kept."""
        kept, lines = [], []
        for name, content in files:
            try:
                notes = inspect_upload(name, content)
                kept.append(self.explorer.load(name, content))
            except ValueError as error:
                lines.append(f"✗ {error}")
                continue
            except Exception as error:  # whatever a file does, the page keeps working
                lines.append(f"✗ could not segment {name}: {type(error).__name__}: {error}")
                continue
            lines.extend(f"• {kept[-1]}: {note}" for note in notes)
        self.messages.value = "".join(
            f'<div class="egeunet-message">{html.escape(line)}</div>' for line in lines
        )
        if kept:
            self.choice.unobserve(self._on_choice, names="value")
            self.choice.options = list(self.explorer.images)
            self.choice.value = self.explorer.current
            self.choice.observe(self._on_choice, names="value")
            self.render()
        return kept

    def _on_upload(self, change: dict) -> None:
        if not change["new"]:
            return
        self.add_files([(item["name"], bytes(item["content"])) for item in change["new"]])
        self.upload.value = ()  # frees the bytes; the same file can be uploaded again

    def _on_setting(self, _change: dict) -> None:
        self.render()

    def _on_choice(self, change: dict) -> None:
        if change["new"]:
            self.explorer.current = change["new"]
            self.render()

    def render(self) -> None:
        """Show the current image at the slider's threshold, its area and the downloads."""
        explorer = self.explorer
        explorer.threshold = round(float(self.threshold.value), 4)
        explorer.pixel_size_mm = float(self.pixel_size.value)
        self.choice.layout.display = "" if len(explorer.images) > 1 else "none"
        self.pictures.layout.display = "" if explorer.current else "none"
        if not explorer.current:
            return
        name, mask = explorer.current, explorer.mask()
        self.overlay.value, self.mask.value = display_pictures(explorer.image, mask)
        self.area.value = area_html(name, explorer.area(), explorer.threshold)
        areas = explorer.area_rows()
        self.downloads.value = " · ".join(
            [
                download_link(
                    encode_png(mask_pixels(mask)),
                    mask_filename(name),
                    "image/png",
                    f"download mask PNG ({mask_filename(name)})",
                    "egeunet-download-mask",
                ),
                download_link(
                    areas.to_csv(index=False).encode(),
                    AREAS_FILE,
                    "text/csv",
                    f"download areas CSV ({len(areas)} image(s))",
                    "egeunet-download-csv",
                ),
            ]
        )
        self.table.value = areas.to_html(
            index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0
        )


def area_html(name: str, area: dict, threshold: float) -> str:
    """The lesion area of one image in words."""
    share = 100 * area["lesion_fraction"]
    text = (
        f"<b>{html.escape(name)}</b> at threshold {threshold:.2f}: lesion "
        f"{area['lesion_pixels']:,} of {area['total_pixels']:,} pixels ({share:.1f}% of the image)"
    )
    if area["lesion_area_mm2"] == area["lesion_area_mm2"]:  # not NaN: a pixel size is known
        text += f", {area['lesion_area_mm2']:.2f} mm²"
    else:
        text += "; give the pixel size for mm²"
    return f"<p>{text}</p>"


def lesion_app(
    weights: str | os.PathLike,
    threshold: float = THRESHOLD,
    pixel_size_mm: float = 0.0,
    device: str = "auto",
) -> LesionApp:
    """The app's widgets for the model in ``weights`` (checkpoint file or shipped name)."""
    from egeunet.lesion import LesionExplorer, Segmenter

    return LesionApp(LesionExplorer(Segmenter(weights, device), threshold, pixel_size_mm))


# --- Serving -----------------------------------------------------------------------------


def app_notebook(
    checkpoint: Path, threshold: float, pixel_size_mm: float, notebooks: Path | None = None
) -> nbformat.NotebookNode:
    """05_inference as the app serves it: the cells tagged ``folder`` left out, and the
    app's parameters injected after the parameters cell (as papermill does)."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from egeunet.study import notebooks_dir

    path = (notebooks or notebooks_dir()) / APP_NOTEBOOK
    if not path.is_file():
        raise FileNotFoundError(f"notebook {path} not found (set EGEUNET_NOTEBOOKS)")
    notebook = load_notebook_node(str(path))  # with the metadata papermill expects
    notebook.cells = [c for c in notebook.cells if FOLDER_TAG not in c.metadata.tags]
    parameters = {
        "checkpoint": str(checkpoint.resolve()),
        "input_path": "",
        "threshold": threshold,
        "pixel_size_mm": pixel_size_mm,
        "device": "cpu",
        "interactive": True,
    }
    return parameterize_notebook(notebook, parameters, comment="Parameters of egeunet app")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """ValueError naming the port if nothing can listen on ``host:port`` now."""
    if not 0 < port < 65536:
        raise ValueError(f"--port: expected 1-65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"--port {port} on {host}: cannot listen there ({error.strerror}); "
                "choose another port with --port"
            ) from None


def voila_options(host: str, port: int) -> tuple[list[str], str]:
    """Voilà's command-line options for the app, and the query the address needs (a
    random token on a host other than loopback, else nothing)."""
    options = [
        f"--port={port}",
        f"--Voila.ip={host}",
        "--Voila.port_retries=0",  # the port asked for, or an error; never another one
        "--no-browser",
        "--strip_sources=True",
    ]
    if is_loopback(host):
        return options, ""
    token = secrets.token_urlsafe(24)
    return [*options, f"--token={token}"], f"?token={token}"


def serve(
    weights: str | os.PathLike = DEFAULT_WEIGHTS,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    threshold: float = THRESHOLD,
    pixel_size_mm: float = 0.0,
    log=print,
) -> None:
    """Serve the app until interrupted (Ctrl+C). A host other than loopback gets a token
    in the address, since anyone who reaches the port could otherwise use the page."""
    from egeunet.study import check_kernel

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must lie strictly between 0 and 1, got {threshold}")
    if pixel_size_mm < 0:
        raise ValueError(f"--pixel-size-mm must be 0 (unknown) or positive, got {pixel_size_mm}")
    import nbformat

    checkpoint = resolve_weights(weights)
    load_model(checkpoint)  # a bad file fails here, in words, not later in the page
    check_kernel()
    check_port_free(host, port)
    try:
        from voila.app import Voila
    except ImportError:
        raise ValueError("egeunet app needs Voilà: pip install voila") from None
    options, query = voila_options(host, port)
    with tempfile.TemporaryDirectory(prefix="egeunet-app-") as folder:
        notebook = Path(folder) / "EGE-UNet lesion segmenter.ipynb"
        write_text_atomic(
            notebook, nbformat.writes(app_notebook(checkpoint, threshold, pixel_size_mm))
        )
        shown_host = f"[{host}]" if ":" in host else host
        log(
            f"egeunet app: segmenting with {checkpoint}\n"
            f"open http://{shown_host}:{port}/{query} in a browser (Ctrl+C stops the app)",
        )
        Voila.launch_instance(
            argv=[str(notebook), *options],
            tornado_settings={
                "websocket_max_message_size": WEBSOCKET_MAX_MESSAGE_BYTES,
                "headers": {"Content-Security-Policy": CONTENT_SECURITY_POLICY},
            },
        )


def run_app(args: argparse.Namespace) -> int:
    serve(
        args.weights,
        args.port,
        args.host,
        args.threshold,
        args.pixel_size_mm,
        log=lambda text: print(text, flush=True),
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="the lesion segmenter as a web page (upload images, masks, areas)",
        description="Serve the inference notebook as a web app with Voilà: upload images, "
        "see overlay and mask, move the threshold, read lesion areas, download the mask "
        "PNG and the areas CSV. Runs offline on the CPU; open the printed address.",
    )
    parser.add_argument(
        "--weights",
        default=DEFAULT_WEIGHTS,
        help="a checkpoint file, or shipped weights: "
        f"{', '.join(SHIPPED_WEIGHTS)} (default {DEFAULT_WEIGHTS})",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default {DEFAULT_PORT})")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this computer only)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=THRESHOLD,
        help=f"initial threshold (default {THRESHOLD})",
    )
    parser.add_argument(
        "--pixel-size-mm",
        type=float,
        default=0.0,
        help="initial side of one pixel in mm, for areas in mm² (default 0: unknown)",
    )
    parser.set_defaults(func=run_app)
