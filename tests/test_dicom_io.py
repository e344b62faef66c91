"""DICOM reading: intensities by the standard's formulas, transfer syntaxes, errors, orientation, geometry."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_windowing

from tests.fixtures.dicom import (
    BASIC_TEXT_SR,
    BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    breast_phantom,
    write_not_dicom,
    write_truncated,
    write_undecodable,
)
from workspace.base.errors import DicomReadError
from workspace.data.dicom_io import (
    chest_wall_side,
    flip_array,
    foreground_mask,
    from_normalised,
    read_dicom,
    to_normalised,
    upsample_mask,
    window_unit,
)

TOP12 = 4095


# -- windowing: the standard's formulas, by hand ------------------------------------------------------

def test_linear_window_matches_the_formula_by_hand():
    # c = 100, w = 50: below 75 -> 0, above 124 -> 1, between: (x - 75) / 49.
    x = np.array([0, 75, 76, 99.5, 100, 123, 124, 124.5, 500])
    expected = [0, 0, 1 / 49, 24.5 / 49, 25 / 49, 48 / 49, 1, 1, 1]
    assert np.allclose(window_unit(x, 100, 50, "LINEAR"), expected)


def test_linear_exact_and_sigmoid_windows_match_the_formulas_by_hand():
    x = np.array([50, 75, 80, 100, 125, 130])
    assert np.allclose(window_unit(x, 100, 50, "LINEAR_EXACT"), [0, 0, 0.1, 0.5, 1.0, 1.0])
    sig = window_unit(np.array([75.0, 100.0, 125.0]), 100, 50, "SIGMOID")
    assert np.allclose(sig, [1 / (1 + math.exp(2)), 0.5, 1 / (1 + math.exp(-2))])


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_agrees_with_pydicom_apply_windowing(function):
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 12, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1800.0, 900.0, function
    x = np.random.default_rng(0).integers(0, TOP12 + 1, 2000).astype(np.float64)
    theirs = apply_windowing(x.copy(), ds) / TOP12  # pydicom's output range is [0, 2**12 - 1]
    assert np.allclose(window_unit(x, 1800, 900, function), theirs, atol=1e-9)


def test_bad_window_width_and_function_are_refused():
    with pytest.raises(DicomReadError, match="width"):
        window_unit(np.zeros(3), 10, 0.5, "LINEAR")
    with pytest.raises(DicomReadError, match="unsupported VOI LUT Function"):
        window_unit(np.zeros(3), 10, 5, "GAMMA")


# -- the pipeline: rescale, then window / VOI LUT, then MONOCHROME1 inversion -----------------------------

def test_display_applies_rescale_then_window_then_monochrome1_inversion(dicom_writer):
    stored = breast_phantom((64, 48))
    path = dicom_writer("m1.dcm", stored, photometric="MONOCHROME1", rescale=(2.0, -100.0),
                        window=(3000.0, 2000.0), voi_function="LINEAR")
    image = read_dicom(path, orientation=(False, False))
    display = image.display_pixels()
    for r, c in [(0, 0), (32, 5), (20, 30), (50, 10)]:
        m = 2.0 * stored[r, c] - 100.0                  # modality LUT
        lo, hi = 3000 - 0.5 - 1999 / 2, 3000 - 0.5 + 1999 / 2
        y = 0.0 if m <= lo else 1.0 if m > hi else (m - 2999.5) / 1999 + 0.5   # LINEAR window
        assert display[r, c] == round((1.0 - y) * 255)     # MONOCHROME1 inverted last
    assert image.voi_function == "LINEAR" and image.window_center == 3000.0


def test_sigmoid_window_from_the_file(dicom_writer):
    stored = breast_phantom((64, 48))
    image = read_dicom(dicom_writer("s.dcm", stored, window=(1500.0, 1000.0), voi_function="SIGMOID"),
                       orientation=(False, False))
    r, c = 32, 4
    expected = 1 / (1 + math.exp(-4 * (stored[r, c] - 1500.0) / 1000.0))
    assert image.display_pixels()[r, c] == round(expected * 255)
    assert image.meta["voi_function"] == "SIGMOID"


def test_voi_lut_sequence_is_used_and_preferred_over_the_window(dicom_writer):
    stored = breast_phantom((64, 48))
    first, n = 100, 3000
    table = [round(255 * math.sqrt(i / (n - 1))) for i in range(n)]
    path = dicom_writer("lut.dcm", stored, voi_lut=(first, 8, table), window=(10.0, 2.0))
    display = read_dicom(path, orientation=(False, False)).display_pixels()
    for value in (0, 99, 100, 1234, 3099, 3100, 4000):
        hits = np.argwhere(stored == value)
        if len(hits):
            r, c = hits[0]
            expected = table[min(max(value - first, 0), n - 1)]  # clamped to the table's ends
            assert display[r, c] == expected
    # every pixel, vectorised
    idx = np.clip(stored.astype(int) - first, 0, n - 1)
    assert np.array_equal(display, np.asarray(table, dtype=np.uint8)[idx])


def test_model_pixels_scaled_by_bits_stored_and_monochrome1_inverted(dicom_writer):
    stored = breast_phantom((64, 48))
    m2 = read_dicom(dicom_writer("m2.dcm", stored), orientation=(False, False)).model_pixels()
    assert m2.dtype == np.float32
    assert np.allclose(m2, stored / TOP12, atol=1e-6)
    m1 = read_dicom(dicom_writer("m1.dcm", TOP12 - stored, photometric="MONOCHROME1"),
                    orientation=(False, False)).model_pixels()
    assert np.allclose(m1, stored / TOP12, atol=1e-6)  # dense tissue bright in both


def test_rescale_is_scaled_by_its_own_range(dicom_writer):
    stored = breast_phantom((64, 48))
    # An affine rescale maps the stored range [0, 4095] to [-100, 8090]: normalised values are unchanged.
    img = read_dicom(dicom_writer("r.dcm", stored, rescale=(2.0, -100.0)), orientation=(False, False))
    assert img.modality_range() == (-100.0, 8090.0)
    assert np.allclose(img.model_pixels(), stored / TOP12, atol=1e-6)
    assert float(img.model_pixels().min()) >= 0.0 and float(img.model_pixels().max()) <= 1.0
    # A negative slope flips the meaning of the values, and the model sees that.
    neg = read_dicom(dicom_writer("n.dcm", stored, rescale=(-1.0, 4095.0)), orientation=(False, False))
    assert np.allclose(neg.model_pixels(), 1 - stored / TOP12, atol=1e-6)


def test_padding_pixels_become_background(dicom_writer):
    stored = breast_phantom((64, 48))
    stored[:6, :] = TOP12  # a padded strip
    img = read_dicom(dicom_writer("pad.dcm", stored, padding=TOP12), orientation=(False, False))
    assert img.padding is not None and img.padding[:6].all()
    assert (img.model_pixels()[:6] == 0).all()
    assert (img.display_pixels()[:6] == 0).all()
    assert img.display_pixels()[30, 5] > 0


# -- transfer syntaxes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("syntax,uid", [("j2k", "1.2.840.10008.1.2.4.90"), ("rle", "1.2.840.10008.1.2.5"),
                                        ("jpeg-lossless", "1.2.840.10008.1.2.4.70")])
def test_lossless_syntaxes_decode_to_the_same_pixels(dicom_writer, syntax, uid):
    stored = breast_phantom((80, 64), seed=3)
    image = read_dicom(dicom_writer(f"{syntax}.dcm", stored, syntax=syntax))
    assert image.transfer_syntax == uid
    assert np.array_equal(image.stored_pixels, stored)


def test_lossy_jpeg2000_decodes_close_to_the_original(dicom_writer):
    stored = breast_phantom((80, 64), seed=3)
    image = read_dicom(dicom_writer("lossy.dcm", stored, syntax="j2k-lossy"))
    assert image.transfer_syntax == "1.2.840.10008.1.2.4.91"
    diff = np.abs(image.stored_pixels.astype(float) - stored)
    assert 0 < diff.mean() < 0.05 * TOP12


# -- errors --------------------------------------------------------------------------------------------

def test_each_bad_input_gets_a_specific_error(tmp_path, dicom_writer):
    cases = {
        write_truncated(tmp_path / "cut.dcm"): "truncated",
        write_truncated(tmp_path / "cut_header.dcm", keep_fraction=0.05): "truncated",
        write_not_dicom(tmp_path / "x.pdf"): "not a DICOM file",
        dicom_writer("sr.dcm", with_pixels=False, modality="SR", sop_class=BASIC_TEXT_SR): "no pixel data",
        write_undecodable(tmp_path / "mpeg.dcm"): "no pixel data decoder exists in pydicom for transfer "
                                                  "syntax MPEG2",
        tmp_path / "missing.dcm": "no such file",
    }
    for path, message in cases.items():
        with pytest.raises(DicomReadError, match=message):
            read_dicom(path)


def test_too_small_and_colour_images_are_refused(dicom_writer):
    small = dicom_writer("small.dcm", breast_phantom((100, 80)))
    assert read_dicom(small).rows == 100  # no minimum unless asked
    with pytest.raises(DicomReadError, match=r"too small \(100 x 80\) for one 512 x 512 patch"):
        read_dicom(small, min_size=512)
    rgb = Path(pydicom.data.get_testdata_file("SC_rgb.dcm", download=False))
    with pytest.raises(DicomReadError, match="not a grayscale image"):
        read_dicom(rgb)


def test_missing_decoder_plugin_is_named(dicom_writer):
    """JPEG lossless decodes here only through GDCM; in a Python where gdcm cannot be imported, the error
    names the plugins pydicom would need."""
    path = dicom_writer("jll.dcm", syntax="jpeg-lossless")
    code = ("import sys; sys.modules['gdcm'] = None\n"
            "from workspace.data.dicom_io import read_dicom\n"
            "from workspace.base.errors import DicomReadError\n"
            f"try:\n    read_dicom({str(path)!r})\nexcept DicomReadError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert "no decoder installed for transfer syntax JPEG Lossless" in out.stdout, out.stderr
    assert "pylibjpeg-libjpeg" in out.stdout


# -- header fields --------------------------------------------------------------------------------------

def test_header_fields_and_identifiers_kept_apart(dicom_writer):
    image = read_dicom(dicom_writer("h.dcm", laterality="R", use_laterality_tag=True, view=None,
                                    view_code=("399368009", "SCT", "medio-lateral oblique"),
                                    pixel_spacing=(0.085, 0.07), imager_spacing=True, window=(2000, 3000)))
    assert image.laterality == "R" and image.view == "MLO"
    assert image.pixel_spacing == (0.085, 0.07)
    assert image.meta["pixel_spacing_row"] == 0.085 and image.meta["bits_stored"] == 12
    assert image.photometric == "MONOCHROME2" and image.modality == "MG"
    assert image.patient == {"source_patient_id": PATIENT_ID, "patient_name": PATIENT_NAME,
                             "birth_date": BIRTH_DATE}
    assert not {PATIENT_ID, PATIENT_NAME, BIRTH_DATE} & {str(v) for v in image.meta.values()}


@pytest.mark.parametrize("code,expected", [(("R-10242", "SRT", "cranio-caudal"), "CC"),
                                           (("399260004", "SCT", "medio-lateral"), "ML"),
                                           (("R-10228", "SRT", "latero-medial"), "LM"),
                                           (("", "", "cranio-caudal exaggerated laterally"), "XCCL")])
def test_view_from_view_code_sequence(dicom_writer, code, expected):
    assert read_dicom(dicom_writer("v.dcm", view=None, view_code=code)).view == expected


# -- orientation ----------------------------------------------------------------------------------------

def _normalised_side(image) -> str | None:
    return chest_wall_side(image.foreground())


def test_left_breast_stays_and_right_breast_is_mirrored(dicom_writer):
    left = breast_phantom((96, 64), chest_wall="left")
    right = breast_phantom((96, 64), chest_wall="right")
    lcc = read_dicom(dicom_writer("l.dcm", left, laterality="L", patient_orientation=("A", "R")))
    rcc = read_dicom(dicom_writer("r.dcm", right, laterality="R", patient_orientation=("P", "L")))
    assert (lcc.flip_horizontal, lcc.flip_vertical, lcc.warnings) == (False, False, [])
    assert (rcc.flip_horizontal, rcc.flip_vertical, rcc.warnings) == (True, False, [])
    assert np.allclose(rcc.model_pixels(), right[:, ::-1] / TOP12, atol=1e-6)
    assert _normalised_side(lcc) == _normalised_side(rcc) == "left"


def test_pixels_overrule_a_wrong_header_with_a_warning(dicom_writer):
    left = breast_phantom((96, 64), chest_wall="left")
    image = read_dicom(dicom_writer("liar.dcm", left, laterality="R", patient_orientation=("P", "L")))
    assert image.flip_horizontal is False
    assert len(image.warnings) == 1 and "trusted the pixels" in image.warnings[0]
    assert _normalised_side(image) == "left"


def test_orientation_from_pixels_alone_and_from_fov_flip(dicom_writer):
    right = breast_phantom((96, 64), chest_wall="right")
    bare = read_dicom(dicom_writer("bare.dcm", right, laterality=None, view=None))
    assert bare.flip_horizontal is True and bare.warnings == []
    # A right breast stored with the field of view flipped has its chest wall on the left: header and
    # pixels agree, no warning.
    left = breast_phantom((96, 64), chest_wall="left")
    fov = read_dicom(dicom_writer("fov.dcm", left, laterality="R", fov_horizontal_flip="YES"))
    assert fov.header_flips()[0] is False and fov.flip_horizontal is False and fov.warnings == []


def test_vertical_flip_from_patient_orientation(dicom_writer):
    left = breast_phantom((96, 64), chest_wall="left")
    up = read_dicom(dicom_writer("mlo_up.dcm", left, view="MLO", patient_orientation=("A", "HR")))
    assert up.flip_vertical is True
    normal = read_dicom(dicom_writer("mlo.dcm", left, view="MLO", patient_orientation=("A", "FR")))
    assert normal.flip_vertical is False
    cc = read_dicom(dicom_writer("cc.dcm", left, view="CC", laterality="L", patient_orientation=("A", "L")))
    assert cc.flip_vertical is True
    assert np.array_equal(up.display_pixels(), normal.display_pixels()[::-1])


def test_blank_image_keeps_header_orientation_with_a_warning_when_none(dicom_writer):
    flat = np.full((64, 48), 1000, dtype=np.uint16)
    image = read_dicom(dicom_writer("flat.dcm", flat, laterality=None, view=None))
    assert image.flip_horizontal is False and "orientation" in image.warnings[0]
    assert not foreground_mask(image.display_pixels()).any()


# -- foreground -----------------------------------------------------------------------------------------

def test_foreground_is_largest_component_with_holes_filled():
    display = np.zeros((400, 320), dtype=np.uint8)
    y, x = np.mgrid[0:400, 0:320]
    display[((x / 220.0) ** 2 + ((y - 200) / 160.0) ** 2) <= 1] = 150
    display[190:210, 60:80] = 0          # a dark hole inside the breast
    display[10:40, 280:310] = 255        # a bright marker, not connected
    mask = foreground_mask(display, downsample=8)
    assert mask.shape == (50, 40)
    assert mask[200 // 8, 70 // 8]       # hole filled
    assert not mask[25 // 8, 295 // 8]   # marker dropped
    assert not mask[0, 0]
    full = upsample_mask(mask, 400, 320)
    assert full.shape == (400, 320) and full[200, 70] and not full[399, 319]
    odd = upsample_mask(np.ones((13, 7), bool), 100, 50)
    assert odd.shape == (100, 50) and odd.all()


# -- geometry round trips --------------------------------------------------------------------------------

FLIPS = [(False, False), (True, False), (False, True), (True, True)]
GEOMETRIES = [
    ("point", [10.5, 20.0]),
    ("box", [3, 4, 10, 6]),
    ("polygon", [[1, 2], [30, 5], [12, 40.5]]),
    ("ellipse", {"cx": 15.0, "cy": 22.0, "rx": 8.0, "ry": 4.0, "angle": 30.0}),
    ("circle", {"cx": 5.0, "cy": 7.0, "r": 3.0}),
    ("mask", {"bbox": [2, 3, 4, 5], "note": "kept"}),
]


@pytest.mark.parametrize("flips", FLIPS)
@pytest.mark.parametrize("kind,geometry", GEOMETRIES)
def test_geometry_round_trip(kind, geometry, flips):
    image = {"rows": 60, "cols": 40, "flip_horizontal": flips[0], "flip_vertical": flips[1]}
    there = to_normalised(kind, geometry, image)
    assert from_normalised(kind, there, image) == geometry
    if any(flips) and kind != "mask":
        assert there != geometry


def _raster_ellipse(shape, g):
    y, x = np.mgrid[0:shape[0], 0:shape[1]] + 0.5  # pixel centres
    t = math.radians(g["angle"])
    dx, dy = x - g["cx"], y - g["cy"]
    u, v = dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)
    return (u / g["rx"]) ** 2 + (v / g["ry"]) ** 2 <= 1


@pytest.mark.parametrize("flips", FLIPS)
def test_mapped_geometry_covers_the_same_pixels_as_the_flipped_image(flips):
    image = {"rows": 60, "cols": 40, "flip_horizontal": flips[0], "flip_vertical": flips[1]}
    box = [3, 4, 10, 6]
    original = np.zeros((60, 40), bool)
    original[4:10, 3:13] = True
    bx, by, bw, bh = to_normalised("box", box, image)
    mapped = np.zeros((60, 40), bool)
    mapped[by:by + bh, bx:bx + bw] = True
    assert np.array_equal(flip_array(original, *flips), mapped)
    assert np.array_equal(to_normalised("mask", original, image), mapped)
    ellipse = {"cx": 20.0, "cy": 25.0, "rx": 12.0, "ry": 5.0, "angle": 35.0}
    assert np.array_equal(flip_array(_raster_ellipse((60, 40), ellipse), *flips),
                          _raster_ellipse((60, 40), to_normalised("ellipse", ellipse, image)))
    point = to_normalised("point", [3.5, 4.5], image)  # centre of pixel (row 4, col 3)
    assert mapped[int(point[1]), int(point[0])]


# -- a real third-party file -------------------------------------------------------------------------------

def _pydicom_data(name: str) -> Path:
    import data_store  # the pydicom-data package (dev dependency); files on disk, nothing downloaded

    path = Path(data_store.__file__).parent / "data" / name
    assert path.exists(), f"pydicom-data file {name} not installed"
    return path


def test_real_jpeg2000_monochrome1_file_reads_like_its_uncompressed_twin():
    """pydicom-data's RG3_J2KR.dcm: a CR image (1760 x 1760, 10 bits stored), MONOCHROME1, JPEG 2000
    lossless; RG3_UNCR.dcm is the same image uncompressed. RG3_J2KI.dcm is the lossy version."""
    j2k = read_dicom(_pydicom_data("RG3_J2KR.dcm"))
    plain = read_dicom(_pydicom_data("RG3_UNCR.dcm"))
    assert j2k.transfer_syntax == "1.2.840.10008.1.2.4.90" and j2k.photometric == "MONOCHROME1"
    assert (j2k.rows, j2k.cols, j2k.bits_stored) == (1760, 1760, 10)
    assert np.array_equal(j2k.stored_pixels, plain.stored_pixels)
    assert (j2k.flip_horizontal, j2k.flip_vertical) == (plain.flip_horizontal, plain.flip_vertical)
    assert np.array_equal(j2k.display_pixels(), plain.display_pixels())
    # MONOCHROME1: the smallest stored value is the brightest pixel in both views.
    stored = j2k.stored_pixels
    model = flip_array(j2k.model_pixels(), j2k.flip_horizontal, j2k.flip_vertical)  # back to stored layout
    display = flip_array(j2k.display_pixels(), j2k.flip_horizontal, j2k.flip_vertical)
    lo, hi = np.unravel_index(stored.argmin(), stored.shape), np.unravel_index(stored.argmax(), stored.shape)
    assert model[lo] > model[hi] and display[lo] >= display[hi]
    assert np.allclose(model, 1 - stored / 1023.0, atol=1e-6)
    lossy = read_dicom(_pydicom_data("RG3_J2KI.dcm"), orientation=(False, False))
    assert np.abs(lossy.stored_pixels.astype(float) - stored).mean() < 10
