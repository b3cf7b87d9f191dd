"""Broken inputs: each must give a clear error naming the input and the fix, or (for convertible
images) a conversion with a note naming the file and the mode. Counted by conftest.py."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nb_edit.core.images import BadInputError, ImageConversionWarning, load_image, to_tensor, to_uint8
from nb_edit.core.validation import (
    Param,
    SkipCounter,
    TooManyBadSamples,
    check_edit_type,
    check_instruction,
    check_params,
    read_jsonl,
)
from nb_edit.models.vlm.parsing import parse_score, parse_yes_no

SPEC = {"profile": Param(str), "seed": Param(int, lo=0), "steps": Param(int, lo=1, hi=100_000),
        "lr": Param(float, lo=0.0, hi=1.0), "model_id": Param(str, required_for=("full",))}


def expect_bad(call, *args, names, fix, error=BadInputError, **kwargs):
    """The call raises ``error`` whose message names the input and says how to fix it."""
    with pytest.raises(error) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert str(names) in message, message
    assert "Fix:" in message and fix.lower() in message.lower(), message
    return message


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(path)
    return path


def converted(path, mode):
    with pytest.warns(ImageConversionWarning) as notes:
        image = load_image(path)
    assert any(str(path) in str(n.message) and mode in str(n.message) for n in notes)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return image


# --- image files -------------------------------------------------------------------------

@pytest.mark.bad_input
def test_missing_file(tmp_path):
    expect_bad(load_image, tmp_path / "nope.png", names=tmp_path / "nope.png", fix="check the path")


@pytest.mark.bad_input
def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").touch()
    expect_bad(load_image, tmp_path / "empty.png", names=tmp_path / "empty.png", fix="re-download")


@pytest.mark.bad_input
def test_corrupt_file(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(np.random.default_rng(1).bytes(2000))
    message = expect_bad(load_image, tmp_path / "junk.jpg", names=tmp_path / "junk.jpg", fix="re-export")
    assert "corrupt" in message


@pytest.mark.bad_input
def test_truncated_png(png):
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    assert "truncated" in expect_bad(load_image, png, names=png, fix="re-export")


@pytest.mark.bad_input
def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    expect_bad(load_image, path, names=path, fix="re-export")


@pytest.mark.bad_input
def test_decompression_bomb_header(tmp_path):
    """A tiny PNG whose header claims 100000 x 100000 pixels must not be decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    assert "large" in expect_bad(load_image, path, names=path, fix="downscale")


@pytest.mark.bad_input
def test_huge_image_over_max_pixels(png):
    assert "huge" in expect_bad(load_image, png, max_pixels=1000, names=png, fix="raise max_pixels")


@pytest.mark.bad_input
def test_unsupported_format(tmp_path):
    path = tmp_path / "picture.ppm"
    Image.new("RGB", (8, 8)).save(path)
    assert "PPM" in expect_bad(load_image, path, names=path, fix="convert it")


@pytest.mark.bad_input
def test_folder_instead_of_file(tmp_path):
    expect_bad(load_image, tmp_path, names=tmp_path, fix="image file")


@pytest.mark.bad_input
def test_bad_size_argument(png):
    expect_bad(load_image, png, size=(0, 32), names="size=(0, 32)", fix="size=32")


@pytest.mark.bad_input
def test_cmyk_is_converted_with_a_note(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)
    red = converted(path, "CMYK")[8, 8]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


@pytest.mark.bad_input
def test_16_bit_is_scaled_with_a_note(tmp_path):
    path = tmp_path / "scan16.png"
    Image.fromarray(np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)).save(path)
    with Image.open(path) as raw:
        mode = raw.mode  # I;16 or I, depending on the PNG reader
    image = converted(path, mode)
    assert image[..., 0].tolist() == [[0, 128], [255, 4]]  # scaled, not cut to the low byte


@pytest.mark.bad_input
def test_palette_is_expanded_with_a_note(tmp_path):
    path = tmp_path / "icon.gif"
    Image.new("RGB", (8, 8), (0, 0, 255)).convert("P").save(path)
    assert converted(path, "P")[0, 0].tolist() == [0, 0, 255]


@pytest.mark.bad_input
def test_rgba_is_composited_on_white_with_a_note(tmp_path):
    path = tmp_path / "cutout.png"
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # opaque red; the rest fully transparent
    Image.fromarray(pixels, "RGBA").save(path)
    image = converted(path, "RGBA")
    assert image[0, 0].tolist() == [255, 0, 0] and image[3, 3].tolist() == [255, 255, 255]


@pytest.mark.bad_input
def test_gray_with_alpha_is_composited_with_a_note(tmp_path):
    path = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 0)).save(path)
    assert converted(path, "LA")[0, 0].tolist() == [255, 255, 255]


@pytest.mark.bad_input
@pytest.mark.parametrize("mode, fill, expected", [("L", 77, 77), ("1", 1, 255)])
def test_grayscale_is_copied_to_rgb_with_a_note(tmp_path, mode, fill, expected):
    path = tmp_path / f"gray_{mode}.png"
    Image.new(mode, (5, 3), fill).save(path)
    image = converted(path, mode)
    assert image.shape == (3, 5, 3) and (image == expected).all()


@pytest.mark.bad_input
def test_tensors_of_the_wrong_kind():
    expect_bad(to_tensor, np.zeros((4, 4, 3), dtype=np.float32), names="float32", fix="load_image")
    expect_bad(to_uint8, torch.full((1, 3, 2, 2), float("nan")), names="images", fix="check the model")


# --- instructions, edit types, notebook parameters ------------------------------------------

@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_instruction(text):
    expect_bad(check_instruction, text, names="instruction", fix="write what to change")


@pytest.mark.bad_input
def test_over_long_instruction():
    message = expect_bad(check_instruction, "make it red " * 30, max_words=64, names="'make it red make",
                         fix="shorten it")
    assert "90 words" in message


@pytest.mark.bad_input
def test_instruction_not_text():
    expect_bad(check_instruction, b"make it red", names="instruction", fix="pass the edit instruction as text")


@pytest.mark.bad_input
def test_unknown_edit_type():
    message = expect_bad(check_edit_type, "colour", ["color", "shape", "remove"], names="'colour'",
                         fix="use one of color, shape, remove")
    assert "did you mean 'color'" in message


@pytest.mark.bad_input
@pytest.mark.parametrize("params, names, fix", [
    ({"steps": "100"}, "'steps'", "papermill -p steps"),        # wrong type (a string)
    ({"seed": True}, "'seed'", "of type int"),                     # a bool is not an int
    ({"lr": 3.0}, "'lr'", "[0.0, 1.0]"),                          # out of range
    ({"steps": 0}, "'steps'", "[1, 100000]"),                     # below the minimum
    ({"profile": "tine"}, "'profile'", "tiny, full, smoke"),      # unknown profile
    ({"profile": "full"}, "'model_id'", "papermill -p model_id"),  # full needs a hub model
    ({"sedd": 1}, "'sedd'", "use one of profile, seed"),          # unknown parameter
])
def test_bad_papermill_parameters(params, names, fix):
    expect_bad(check_params, params, SPEC, names=names, fix=fix)


def test_good_parameters_pass_and_ints_widen():
    checked = check_params({"profile": "full", "model_id": "org/editor", "lr": 1, "steps": 5}, SPEC)
    assert checked["lr"] == 1.0 and isinstance(checked["lr"], float) and checked["steps"] == 5


# --- metadata, judge answers, skip threshold --------------------------------------------

@pytest.mark.bad_input
def test_non_utf8_metadata_lines_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "metadata.jsonl"
    good = b'{"file_name": "a.png", "instruction": "make it red"}\n'
    path.write_bytes(good * 20 + b'{"instruction": "caf\xe9"}\n' + b"{not json\n" + good * 20)
    counter = SkipCounter(threshold_fraction=0.1, min_seen=10, name="toy")
    records = read_jsonl(path, counter)
    assert len(records) == 40 and counter.reasons == {"not_utf8": 1, "invalid_json": 1}
    assert f"{path}:21" in caplog.text and f"{path}:22" in caplog.text
    assert counter.as_metrics("data.toy")["data.toy.skipped.not_utf8"] == 1.0


@pytest.mark.bad_input
def test_metadata_with_mostly_bad_lines_stops(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b"\xff\xfe garbage\n" * 5)
    message = expect_bad(read_jsonl, path, SkipCounter(0.2, min_seen=4, name=str(path)), names=path,
                         fix="repair or remove", error=TooManyBadSamples)
    assert "not_utf8" in message and f"{path}:2" in message


@pytest.mark.bad_input
def test_missing_metadata_file(tmp_path):
    expect_bad(read_jsonl, tmp_path / "metadata.jsonl", names=tmp_path / "metadata.jsonl", fix="check the path")


@pytest.mark.bad_input
def test_judge_answers_without_a_verdict_are_counted_as_failures():
    answers = ["Yes", "The edit looks plausible.", "I cannot tell", "No", "Score: n/a", "Maybe"]
    counter = SkipCounter(threshold_fraction=0.3, min_seen=4, name="judge answers")
    with pytest.raises(TooManyBadSamples) as caught:
        for answer in answers:
            counter.ok() if parse_yes_no(answer) is not None else counter.skip("no_yes_no", repr(answer))
    assert "judge answers" in str(caught.value) and "'The edit looks plausible.'" in str(caught.value)
    assert parse_score("Score: n/a") is None


@pytest.mark.bad_input
def test_skip_counter_threshold():
    counter = SkipCounter(threshold_fraction=0.25, min_seen=8, name="shapes_train")
    for _ in range(6):
        counter.ok()
    counter.skip("corrupt_image", "a.png")  # 1 of 7: below min_seen, no verdict yet
    with pytest.raises(TooManyBadSamples) as caught:
        counter.skip("corrupt_image", "b.png")  # 2 of 8 = 25%: at the limit, allowed
        counter.skip("corrupt_image", "c.png")  # 3 of 9 = 33%: over it
    assert counter.seen == 9 and "shapes_train" in str(caught.value) and "threshold_fraction" in str(caught.value)


# --- the same code on good inputs ---------------------------------------------------------

def test_resize_crops_or_pads_keeping_the_aspect(tmp_path):
    path = tmp_path / "wide.png"
    pixels = np.zeros((10, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white left quarter
    Image.fromarray(pixels).save(path)
    cropped, padded = load_image(path, size=10), load_image(path, size=(10, 20), fit="pad")
    assert cropped.shape == (10, 10, 3) and cropped.max() < 40  # centre crop drops the white quarter
    assert padded.shape == (10, 20, 3) and (padded[:2] == 255).all() and (padded[5, 10:] == 0).all()


def test_uint8_tensor_round_trip():
    images = np.random.default_rng(3).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    tensor = to_tensor(list(images))
    assert tensor.shape == (2, 3, 5, 7) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(to_uint8(tensor), images) and to_uint8(tensor[0]).shape == (5, 7, 3)
