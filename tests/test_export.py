"""ONNX export and the onnxruntime backend: same probabilities as PyTorch within 1e-4 on
lesion images (real ISIC images where the shared data is present), same masks away from
the threshold, dynamic batch and size, metadata, weights names and clear errors."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_helpers import train_small_checkpoint
from PIL import Image

from egeunet import checkpoint as checkpoint_module
from egeunet.checkpoint import resolve_weights
from egeunet.cli import main as cli_main
from egeunet.data import normalize
from egeunet.predict import TorchBackend, load_backend, read_image

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from egeunet.export import (  # noqa: E402 (after the skips above)
    INPUT_NAME,
    ONNX_FORMAT,
    OUTPUT_NAME,
    OnnxBackend,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic_cache):
    """A checkpoint trained in the test and its ONNX file, written by ``egeunet export``."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = train_small_checkpoint(folder / "run")
    onnx_file = folder / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli_main(
            ["export", "--weights", str(checkpoint), "--format", "onnx", "--out", str(onnx_file)]
        )
    assert code == 0
    return checkpoint, onnx_file, printed.getvalue()


def test_export_reports_its_interface(exported):
    _, onnx_file, printed = exported
    assert f"wrote {onnx_file}" in printed and "multiples of 32" in printed
    assert "(x - min) * 255 / (max - min)" in printed
    difference = float(printed.rsplit("difference", 1)[1])
    assert difference <= TOLERANCE


def test_onnx_file_has_dynamic_axes_and_metadata(exported):
    checkpoint, onnx_file, _ = exported
    model = onnx.load(onnx_file)
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert (graph_input.name, graph_output.name) == (INPUT_NAME, OUTPUT_NAME)
    for value in (graph_input, graph_output):
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    assert graph_input.type.tensor_type.shape.dim[1].dim_value == 3
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["egeunet.format"] == ONNX_FORMAT
    assert metadata["egeunet.output"] == "probability"
    assert metadata["egeunet.normalization"] == "minmax"
    assert "max - min" in metadata["egeunet.input_scaling"]
    assert metadata["egeunet.image_size"] == "64" and metadata["egeunet.size_multiple"] == "32"
    assert metadata["egeunet.source"] == checkpoint.name
    # No op of the training-only paths (autograd Functions, compiled kernels) in the graph.
    assert not {n.op_type for n in model.graph.node} & {"PythonOp", "ATen"}


def _batch(paths, size: int) -> torch.Tensor:
    return torch.stack(
        [
            normalize(torch.from_numpy(read_image(p, size)[1]).permute(2, 0, 1), "minmax")
            for p in paths
        ]
    )


@pytest.mark.parametrize("size", [64, 256])
def test_onnxruntime_probabilities_match_torch(exported, lesion_images, size):
    """At the trained size, and at 256 (dynamic size; where a naive float32 GroupNorm
    reduction in ONNX Runtime used to be off by ~7e-3), for a batch of four."""
    checkpoint, onnx_file, _ = exported
    batch = _batch(lesion_images, size)
    torch_probabilities = TorchBackend(checkpoint, "cpu").probabilities(batch)
    onnx_probabilities = OnnxBackend(onnx_file).probabilities(batch)
    assert onnx_probabilities.shape == (len(lesion_images), size, size)
    assert float((onnx_probabilities - torch_probabilities).abs().max()) <= TOLERANCE
    # The check has teeth: the masks are neither empty nor full.
    assert 0.01 < float((torch_probabilities >= 0.5).float().mean()) < 0.99


def test_predict_backends_give_the_same_masks(exported, lesion_images, tmp_path):
    checkpoint, onnx_file, _ = exported
    inputs = [str(p) for p in lesion_images]
    assert cli_main(["predict", "--checkpoint", str(checkpoint), "--input", *inputs,
                     "--output", str(tmp_path / "torch")]) == 0  # fmt: skip
    assert cli_main(["predict", "--backend", "onnxruntime", "--onnx", str(onnx_file),
                     "--input", *inputs, "--output", str(tmp_path / "onnx")]) == 0  # fmt: skip
    torch_backend = TorchBackend(checkpoint, "cpu")
    for path in lesion_images:
        name = f"{path.stem}_mask.png"
        torch_mask = np.asarray(Image.open(tmp_path / "torch" / name)) > 0
        onnx_mask = np.asarray(Image.open(tmp_path / "onnx" / name)) > 0
        original, model_input = read_image(path, torch_backend.size)
        assert torch_mask.shape == original.shape[:2]
        x = normalize(torch.from_numpy(model_input).permute(2, 0, 1), "minmax")[None]
        probability = F.interpolate(
            torch_backend.probabilities(x)[None], size=original.shape[:2], mode="bilinear"
        )[0, 0].numpy()
        away = np.abs(probability - 0.5) > TOLERANCE
        np.testing.assert_array_equal(torch_mask[away], onnx_mask[away])


def test_group_norm_written_out_for_export_matches_aten():
    from egeunet.model import _group_norm_by_rows

    generator = torch.Generator().manual_seed(0)
    x = 500 + 3 * torch.randn(2, 8, 24, 40, generator=generator, dtype=torch.float64)
    weight, bias = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(
        _group_norm_by_rows(x, 4, weight, bias, 1e-5),
        F.group_norm(x, 4, weight, bias, 1e-5),
        rtol=0,
        atol=1e-10,
    )


def test_onnx_backend_refuses_foreign_files(exported, tmp_path):
    checkpoint, onnx_file, _ = exported
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"garbage\.onnx could not be read"):
        OnnxBackend(garbage)
    with pytest.raises(ValueError, match=r"best\.pt could not be read"):
        load_backend(checkpoint, "onnxruntime")
    identity = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "identity",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(identity, foreign)
    with pytest.raises(ValueError, match=r"foreign\.onnx was not written by `egeunet export`"):
        OnnxBackend(foreign)
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        OnnxBackend(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="CPU only"):
        OnnxBackend(onnx_file, device="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend(onnx_file, "tensorrt")


def test_export_and_predict_options_fail_clearly(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "WEIGHTS_FOLDER", tmp_path)  # nothing shipped here
    checkpoint, onnx_file, _ = exported
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    cases = [
        (["export", "--weights", str(checkpoint), "--out", str(onnx_file)], "exists"),
        (["export", "--weights", str(checkpoint), "--out", str(tmp_path / "a.onnx"),
          "--size", "100"], "--size: expected a positive multiple of 32"),
        (["export", "--weights", "isic2018", "--out", str(tmp_path / "b.onnx")],
         "the shipped weights are not installed"),
        (["export", "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "c.onnx")],
         "nope.pt: no such checkpoint file"),
        (["predict", "--checkpoint", str(checkpoint), "--onnx", str(onnx_file), "--input",
          str(image), "--output", str(tmp_path / "o")], "not both"),
        (["predict", "--backend", "onnxruntime", "--checkpoint", str(checkpoint), "--input",
          str(image), "--output", str(tmp_path / "o")], "needs --onnx"),
        (["predict", "--input", str(image), "--output", str(tmp_path / "o")],
         "give --weights"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "o").exists()


def test_shipped_weights_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "WEIGHTS_FOLDER", tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"'isic2017': the shipped weights are not installed .*isic2017\.pt"
    ):
        resolve_weights("isic2017")
    (tmp_path / "isic2017.pt").write_bytes(b"")
    empty_sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    (tmp_path / "isic2017.json").write_text(json.dumps({"sha256": empty_sha256}))
    assert resolve_weights("isic2017") == tmp_path / "isic2017.pt"
    with pytest.raises(FileNotFoundError, match="not the name of shipped weights"):
        resolve_weights("isic2019")
