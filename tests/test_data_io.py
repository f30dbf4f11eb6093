"""megatron.data.io: decoding 8/16-bit grayscale and RGB files, and clear errors for bad files."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from megatron.data.io import read_image, read_image_size, write_image
from megatron.errors import DataError, MegatronError


def test_8bit_gray_png_round_trips(tmp_path):
    img = np.arange(40 * 30, dtype=np.uint32).reshape(30, 40).astype(np.uint8)
    write_image(tmp_path / "a.png", img)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (30, 40)
    np.testing.assert_array_equal(out, img)


def test_16bit_gray_keeps_full_range(tmp_path):
    img = (np.arange(20 * 10, dtype=np.uint32).reshape(10, 20) * 300).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a16.png"), img)
    out = read_image(tmp_path / "a16.png")
    assert out.dtype == np.uint16 and out.max() > 255
    np.testing.assert_array_equal(out, img)


def test_16bit_tiff(tmp_path):
    img = np.full((8, 9), 40000, np.uint16)
    cv2.imwrite(str(tmp_path / "a.tif"), img)
    out = read_image(tmp_path / "a.tif")
    assert out.dtype == np.uint16 and out[0, 0] == 40000


def test_rgb_comes_back_in_rgb_order(tmp_path):
    bgr = np.zeros((5, 6, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    out = read_image(tmp_path / "red.png")
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [200, 0, 0]


def test_rgba_drops_alpha_and_jpeg_reads(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 100
    rgba[..., 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert read_image(tmp_path / "a.png").shape == (4, 4, 3)
    cv2.imwrite(str(tmp_path / "g.jpg"), np.full((16, 16), 128, np.uint8))
    g = read_image(tmp_path / "g.jpg")
    assert g.shape == (16, 16) and abs(int(g[8, 8]) - 128) <= 2


def test_header_size_without_decoding(tmp_path):
    cv2.imwrite(str(tmp_path / "w.png"), np.zeros((7, 13), np.uint16))
    assert read_image_size(tmp_path / "w.png") == (13, 7)


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError) as exc:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(exc.value) and "does not exist" in str(exc.value) and "fix:" in str(exc.value)
    assert isinstance(exc.value, MegatronError)


@pytest.mark.parametrize("content, expect", [
    (b"", "empty"),
    (b"this is not an image at all" * 10, "cannot be decoded"),
])
def test_corrupt_files_name_the_file_and_the_fix(tmp_path, content, expect):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        read_image(path)
    assert "bad.png" in str(exc.value) and expect in str(exc.value) and "fix:" in str(exc.value)


def test_truncated_png_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "full.png"), rng.integers(0, 255, (64, 64), dtype=np.uint8))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png"):
        read_image(tmp_path / "cut.png")


def test_float_images_are_unsupported_with_a_fix(tmp_path):
    cv2.imwrite(str(tmp_path / "f.tif"), np.full((4, 4), 0.5, np.float32))
    with pytest.raises(DataError, match="floating-point.*fix:"):
        read_image(tmp_path / "f.tif")


def test_folder_is_not_an_image(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        read_image(tmp_path / "d.png")
