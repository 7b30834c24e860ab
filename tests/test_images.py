"""Finding and decoding images: bundled photos, folders, every PIL mode, EXIF orientation."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from shapcam_ext.cli.images import bundled_photos, expand_images, load_image, to_rgb


def write_png16(path, values: np.ndarray) -> None:
    """A 16-bit PNG written by hand: grey (H, W), grey + alpha (H, W, 2) or RGB (H, W, 3)."""
    height, width = values.shape[:2]
    colour_type = {1: 0, 2: 4, 3: 2}[1 if values.ndim == 2 else values.shape[-1]]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_bundled_photos():
    photos = bundled_photos()
    assert len(photos) >= 5 and {"chelsea", "coffee"} <= photos.keys()
    assert load_image(photos["chelsea"]).size == (451, 300)


def test_sixteen_bit_grey_png_keeps_its_grey_levels(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    write_png16(tmp_path / "ramp16.png", ramp)
    rgb = np.asarray(load_image(tmp_path / "ramp16.png"), dtype=np.float64)
    assert rgb.shape == (48, 64, 3)
    assert np.abs(rgb - (ramp / 257.0)[..., None]).max() <= 0.5  # not clipped to white
    assert rgb.min() == 0 and rgb.max() == 255


@pytest.mark.parametrize("channels", [2, 3], ids=["grey-alpha", "rgb"])
def test_other_sixteen_bit_pngs(tmp_path, channels):
    values = np.random.default_rng(0).integers(0, 65536, (8, 8, channels)).astype(np.uint16)
    if channels == 2:
        values[..., 1] = 65535  # opaque
    write_png16(tmp_path / "deep.png", values)
    rgb = np.asarray(load_image(tmp_path / "deep.png"), dtype=np.float64)
    expected = values[..., :1] if channels == 2 else values
    assert np.abs(rgb - expected / 257.0).max() < 1


GREY = np.array([[0, 64], [128, 255]], dtype=np.uint8)


@pytest.mark.parametrize("mode, values", [
    ("I;16", GREY.astype(np.uint16) * 257),
    ("I", GREY.astype(np.int32) * 257),
    ("F", GREY.astype(np.float32) / 255),
    ("L", GREY),
])
def test_grey_modes_are_scaled_by_their_depth(mode, values):
    img = Image.fromarray(values)  # the dtype picks the mode
    assert img.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb(img))[..., 0], GREY)


@pytest.mark.parametrize("mode, values", [("I", [[-5, 1_000_000]]), ("F", [[-2.0, 3.0]])])
def test_out_of_range_values_are_stretched(mode, values):
    img = Image.fromarray(np.array(values, dtype=np.int32 if mode == "I" else np.float32))
    np.testing.assert_array_equal(np.asarray(to_rgb(img))[0, :, 0], [0, 255])


def test_transparent_pixels_show_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(rgba)).reshape(-1, 3).tolist() == [[255, 255, 255], [10, 20, 30]]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).reshape(-1, 3).tolist() == [[255, 255, 255], [200, 100, 50]]
    assert np.asarray(to_rgb(rgba.convert("LA"))).reshape(-1, 3).tolist()[0] == [255, 255, 255]


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "LA", "PA", "RGB"])
def test_every_mode_decodes_to_rgb(mode):
    img = Image.new("RGB", (5, 3), (255, 255, 255)).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 3)
    assert np.asarray(out).min() >= 250  # white stays white


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    # stored 40 x 20 with the red half on the left; orientation 6 shows it turned 90 degrees clockwise
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated{suffix}"
    stored.save(path, exif=exif)
    upright = np.asarray(load_image(path), dtype=np.int32)
    assert upright.shape == (40, 20, 3)
    assert upright[:20, :, 0].mean() > 200 and upright[20:, :, 2].mean() > 200  # red on top


def test_folders_expand_to_their_images_sorted(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt", "d.npz"):
        (tmp_path / "photos" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "photos" / name).write_bytes(b"")
    (tmp_path / "photos" / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    single = tmp_path / "single.png"
    assert expand_images([single, tmp_path / "photos", tmp_path / "empty"]) == [
        single, tmp_path / "photos" / "a.JPG", tmp_path / "photos" / "b.png", tmp_path / "empty",
    ]
    with pytest.raises(ValueError, match=r"empty is a folder with no image files"):
        load_image(tmp_path / "empty")


def test_unreadable_images(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="broken.png"):
        load_image(path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(bundled_photos()["chelsea"].read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_image(tmp_path / "absent.png")
