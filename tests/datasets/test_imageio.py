"""read_image / read_dicom / read_raw on every native format a CXR dataset ships, and the ways a
file can be unusable."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from leader.shards.imageio import UnreadableImage, read_dicom, read_image, read_raw, stretch_to_uint16

from .fixtures_dicom import corrupt, phantom, write_dicom, write_jpeg, write_png


def stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """What an 8-bit DICOM without a window in its header reads as: its own min..max over 0..255."""
    lo, hi = float(pixels.min()), float(pixels.max())
    return np.rint((pixels - lo) / (hi - lo) * 255).astype(np.uint8)

# ------------------------------------------------------------------------------------------------
# PNG / JPEG


def test_8bit_png_is_returned_exactly(tmp_path):
    pixels = phantom(48, 64, bits=8)
    out = read_image(write_png(tmp_path / "a.png", pixels))
    assert out.dtype == np.uint8 and out.shape == (48, 64)
    np.testing.assert_array_equal(out, pixels)


def test_16bit_png_with_12_bits_used_is_stretched_linearly_to_full_range(tmp_path):
    pixels = phantom(64, 64, bits=12)  # PadChest-style: 16-bit container, 12 bits of data
    out = read_image(write_png(tmp_path / "a.png", pixels))
    assert out.dtype == np.uint16
    assert out.min() == 0 and out.max() == 65535
    lo, hi = float(pixels.min()), float(pixels.max())
    expected = np.rint((pixels - lo) / (hi - lo) * 65535)
    np.testing.assert_array_equal(out, expected)


def test_rgb_png_with_equal_channels_keeps_its_grey_values(tmp_path):
    grey = phantom(32, 32)
    out = read_image(write_png(tmp_path / "rgb.png", np.stack([grey] * 3, axis=-1)))
    np.testing.assert_array_equal(out, grey)


def test_colour_rgba_and_palette_pngs_become_one_grey_channel(tmp_path):
    grey = phantom(32, 32)
    colour = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    out = read_image(write_png(tmp_path / "colour.png", colour))
    assert out.shape == (32, 32) and out.dtype == np.uint8
    luma = np.rint(colour @ np.array([0.299, 0.587, 0.114]))
    assert np.abs(out.astype(float) - luma).max() <= 1

    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "rgba.png", rgba)), grey)

    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    out = read_image(tmp_path / "palette.png")
    assert out.shape == (32, 32) and out.dtype == np.uint8 and out.max() > out.min()


def test_jpeg_reads_as_uint8(tmp_path):
    pixels = phantom(64, 64)
    out = read_image(write_jpeg(tmp_path / "a.jpg", pixels))
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - pixels).mean() < 3


def test_format_comes_from_content_not_extension(tmp_path):
    pixels = phantom(32, 32)
    write_png(tmp_path / "a.png", pixels)
    (tmp_path / "no_extension").write_bytes((tmp_path / "a.png").read_bytes())
    np.testing.assert_array_equal(read_image(tmp_path / "no_extension"), pixels)
    write_dicom(tmp_path / "really_dicom.png", pixels)
    np.testing.assert_array_equal(read_image(tmp_path / "really_dicom.png"), stretch_to_uint8(pixels))


# ------------------------------------------------------------------------------------------------
# MHA / NRRD


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats(tmp_path, suffix):
    import SimpleITK as sitk

    signed = (phantom(40, 50, bits=12).astype(np.int16) - 1000)
    sitk.WriteImage(sitk.GetImageFromArray(signed), str(tmp_path / f"a{suffix}"))
    out = read_image(tmp_path / f"a{suffix}")
    assert out.dtype == np.uint16 and out.shape == (40, 50)
    assert out.min() == 0 and out.max() == 65535
    assert np.corrcoef(out.ravel(), signed.ravel())[0, 1] > 0.9999

    eight = phantom(40, 50)
    sitk.WriteImage(sitk.GetImageFromArray(eight), str(tmp_path / f"b{suffix}"))
    np.testing.assert_array_equal(read_image(tmp_path / f"b{suffix}"), eight)


def test_itk_volume_is_rejected(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.arange(3 * 8 * 8, dtype=np.int16).reshape(3, 8, 8)),
                    str(tmp_path / "vol.mha"))
    with pytest.raises(UnreadableImage, match="2-D"):
        read_image(tmp_path / "vol.mha")


# ------------------------------------------------------------------------------------------------
# What cannot be read


def test_unreadable_files_name_their_reason(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("Image Index,Finding Labels\n")
    (tmp_path / "text.dcm").write_text("patientId,x,y,width,height,Target\n")
    write_png(tmp_path / "blank16.png", np.zeros((32, 32), np.uint16))
    corrupt(write_png(tmp_path / "cut.png", phantom(64, 64)), keep=0.5)
    write_dicom(tmp_path / "nopixels.dcm", phantom(16, 16), include_pixels=False)
    write_dicom(tmp_path / "palette.dcm", phantom(16, 16), photometric="PALETTE COLOR")
    corrupt(write_dicom(tmp_path / "cut.dcm", phantom(64, 64, bits=12)), keep=0.6)
    write_dicom(tmp_path / "multi.dcm", np.concatenate([phantom(16, 16)] * 2),
                extra={"NumberOfFrames": 2, "Rows": 16})
    expected = {
        "missing.png": "file not found",
        "empty.png": "empty file",
        "text.jpg": "not an image",
        "text.dcm": "not a DICOM file",
        "blank16.png": "blank image",
        "cut.png": "truncated",
        "nopixels.dcm": "no pixel data",
        "palette.dcm": "unsupported DICOM photometric interpretation 'PALETTE COLOR'",
        "cut.dcm": "cannot decode DICOM pixel data",
        "multi.dcm": "2 frames",
    }
    for name, reason in expected.items():
        with pytest.raises(UnreadableImage, match=reason):
            read_image(tmp_path / name)


def test_constant_dicom_is_blank(tmp_path):
    write_dicom(tmp_path / "flat.dcm", np.full((16, 16), 7, np.uint16), bits_stored=12)
    with pytest.raises(UnreadableImage, match="blank image"):
        read_image(tmp_path / "flat.dcm")


# ------------------------------------------------------------------------------------------------
# DICOM display pipeline


def ramp12(size: int = 64) -> np.ndarray:
    """Every row the same 0..4095 ramp, so a column is a known raw value."""
    return np.tile(np.linspace(0, 4095, size).round().astype(np.uint16), (size, 1))


def test_window_centre_maps_to_mid_grey_and_ends_clip(tmp_path):
    pixels = ramp12()
    pixels[0, :3] = (1000, 899, 1101)
    out = read_image(write_dicom(tmp_path / "w.dcm", pixels, bits_stored=12, window=(1000, 201)))
    assert out.dtype == np.uint16
    assert abs(int(out[0, 0]) - 32768) < 400  # the window centre is mid-grey
    assert out[0, 1] == 0 and out[0, 2] == 65535  # the window's ends
    assert out[1, 0] == 0 and out[1, -1] == 65535  # beyond the window clips


def test_monochrome1_inverts_after_the_window(tmp_path):
    pixels = ramp12()
    pixels[0, :4] = (899, 1101, 4000, 0)
    out = read_image(
        write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", bits_stored=12,
                    window=(1000, 201))
    )
    # Low raw values are bright, and the window is applied to the raw (un-inverted) values: had the
    # inversion come first, raw 1101 would have become 2994 and shown white, not black.
    assert out[0, 1] == 0
    assert out[0, 0] == 65535 and out[0, 3] == 65535
    assert out[0, 2] == 0


def test_monochrome1_without_window_makes_low_values_bright(tmp_path):
    pixels = ramp12()
    out = read_image(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", bits_stored=12))
    assert out[5, 0] == 65535 and out[5, -1] == 0
    assert np.all(np.diff(out[5].astype(int)) <= 0)


def test_no_window_uses_data_min_max(tmp_path):
    pixels = (ramp12() // 4 + 500).astype(np.uint16)  # 500..1523 out of 4095
    out = read_image(write_dicom(tmp_path / "nw.dcm", pixels, bits_stored=12))
    assert out.min() == 0 and out.max() == 65535
    np.testing.assert_array_equal(out, stretch_to_uint16(pixels))


def test_rescale_is_applied_before_the_window(tmp_path):
    stored = ramp12()
    stored[0, 0] = 1064  # -> 40 after intercept -1024
    out = read_image(write_dicom(tmp_path / "r.dcm", stored, bits_stored=12, rescale=(1, -1024),
                                 window=(40, 401)))
    assert abs(int(out[0, 0]) - 32768) < 200
    assert out[1, 0] == 0 and out[1, -1] == 65535


def test_multi_valued_window_uses_the_first_pair(tmp_path):
    pixels = ramp12()
    pixels[0, 0] = 2000
    out = read_image(write_dicom(tmp_path / "mv.dcm", pixels, bits_stored=12,
                                 window=([2000, 500], [401, 100])))
    assert abs(int(out[0, 0]) - 32768) < 200


def test_window_argument_overrides_the_header(tmp_path):
    pixels = ramp12()
    pixels[0, 0] = 3000
    path = write_dicom(tmp_path / "o.dcm", pixels, bits_stored=12, window=(500, 100))
    assert read_dicom(path)[0, 0] == 65535
    assert abs(int(read_dicom(path, window=(3000, 1001))[0, 0]) - 32768) < 100


def test_sigmoid_voi_function(tmp_path):
    pixels = ramp12()
    pixels[0, 0] = 2048
    out = read_image(write_dicom(tmp_path / "s.dcm", pixels, bits_stored=12, window=(2048, 1000),
                                 voi_function="SIGMOID"))
    assert abs(int(out[0, 0]) - 32768) < 2
    assert 0 < out[1, 0] < 2000 and 63500 < out[1, -1] < 65535


def test_voi_lut_table_is_preferred_to_the_window(tmp_path):
    pixels = ramp12(16)
    # A 4096-entry table that thresholds at 2048, normalised by its own output range.
    table = np.where(np.arange(4096) < 2048, 100, 4000)
    out = read_image(write_dicom(tmp_path / "lut.dcm", pixels, bits_stored=12, window=(10, 10),
                                 voi_lut=(4096, 0, table)))
    assert set(np.unique(out)) == {0, 65535}
    assert out[0, 0] == 0 and out[0, -1] == 65535


def test_eight_bit_dicom_stays_uint8(tmp_path):
    pixels = phantom(64, 64)
    out = read_image(write_dicom(tmp_path / "a.dcm", pixels))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, stretch_to_uint8(pixels))


def test_signed_pixels(tmp_path):
    signed = (ramp12().astype(np.int16) - 2048)
    out = read_image(write_dicom(tmp_path / "s.dcm", signed, bits_stored=12, signed=True))
    assert out[3, 0] == 0 and out[3, -1] == 65535
    assert np.all(np.diff(out[3].astype(int)) >= 0)


@pytest.mark.parametrize("compression,tolerance", [("jpeg", 4.0), ("j2k", 0.0), ("rle", 0.0)])
def test_compressed_dicom_decodes(tmp_path, compression, tolerance):
    pixels = phantom(64, 64)
    out = read_image(write_dicom(tmp_path / f"{compression}.dcm", pixels, compression=compression))
    assert out.dtype == np.uint8
    assert np.abs(out.astype(float) - stretch_to_uint8(pixels)).mean() <= tolerance


def test_twelve_bit_jpeg2000_dicom_is_lossless(tmp_path):
    pixels = ramp12()
    out = read_image(write_dicom(tmp_path / "j.dcm", pixels, bits_stored=12, compression="j2k"))
    np.testing.assert_array_equal(out, stretch_to_uint16(pixels))


def test_colour_dicoms_become_grey(tmp_path):
    grey = phantom(32, 32)
    rgb = np.stack([grey] * 3, axis=-1)
    out = read_image(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    np.testing.assert_array_equal(out, stretch_to_uint8(grey))
    out = read_image(write_dicom(tmp_path / "ybr.dcm", rgb, compression="jpeg"))  # YBR_FULL_422
    assert out.shape == (32, 32) and np.abs(out.astype(float) - stretch_to_uint8(grey)).mean() < 4


def test_dicom_without_preamble_is_read_by_extension(tmp_path):
    """Old archives hold bare implicit-VR datasets: no preamble, no "DICM", no file meta."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    pixels = phantom(32, 32)
    ds = dcmread(write_dicom(tmp_path / "full.dcm", pixels))
    del ds.file_meta
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    (tmp_path / "bare.dcm").write_bytes(buffer.getvalue())
    assert b"DICM" not in (tmp_path / "bare.dcm").read_bytes()[:200]
    np.testing.assert_array_equal(read_image(tmp_path / "bare.dcm"), stretch_to_uint8(pixels))


# ------------------------------------------------------------------------------------------------
# Headerless raw (JSRT)


def test_read_raw_big_endian_12_bit_inverted(tmp_path):
    pixels = ramp12(32)
    pixels.astype(">u2").tofile(tmp_path / "a.IMG")
    out = read_raw(tmp_path / "a.IMG", (32, 32), "uint16", "big", invert=True)
    assert out.dtype == np.uint16
    assert out[0, 0] == 65535 and out[0, -1] == 0
    straight = read_raw(tmp_path / "a.IMG", (32, 32), "uint16", "big", invert=False)
    np.testing.assert_array_equal(straight, stretch_to_uint16(pixels))
    # The same bytes read little-endian are a different (wrong) image: byte order matters.
    assert not np.array_equal(read_raw(tmp_path / "a.IMG", (32, 32), "uint16", "little"), straight)


def test_read_raw_rejects_wrong_size(tmp_path):
    np.zeros(100, ">u2").tofile(tmp_path / "short.IMG")
    with pytest.raises(UnreadableImage, match="200 bytes; expected 2048"):
        read_raw(tmp_path / "short.IMG", (32, 32), "uint16", "big", invert=True)
