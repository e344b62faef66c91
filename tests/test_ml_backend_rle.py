"""Brush RLE and label configs: our vectorised codec against label_studio_sdk's reference, config checks."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush as sdk_brush

from ml_backend import label_configs as lc
from ml_backend import predictions as pr
from ml_backend.rle import RleError, decode_mask, encode_mask


def _masks():
    rng = np.random.default_rng(7)
    noisy = rng.random((37, 53)) > 0.6
    blob = np.zeros((300, 220), bool)
    blob[40:180, 30:200] = True
    long_runs = np.zeros((400, 700), bool)  # runs longer than 2**16 values (16-bit field, chunked)
    long_runs[350:, :] = True
    single = np.zeros((5, 5), bool)
    single[2, 3] = True
    corners = np.zeros((50, 70), bool)  # runs that touch the first and the last pixel
    corners[0, :5] = corners[-1, -3:] = corners[20, 0] = True
    return [noisy, blob, long_runs, single, np.ones((9, 4), bool), np.zeros((6, 6), bool), corners]


@pytest.mark.parametrize("index", range(7))
def test_encoder_writes_exactly_the_sdk_bytes(index):
    mask = _masks()[index]
    ours = encode_mask(mask)
    assert ours == sdk_brush.mask2rle(mask.astype(np.uint8) * 255)
    decoded = sdk_brush.decode_rle(ours).reshape(*mask.shape, 4)
    assert (decoded[:, :, 3] == mask * 255).all()


@pytest.mark.parametrize("index", range(7))
def test_decoder_reads_the_sdk_encoding(index):
    mask = _masks()[index]
    rle = sdk_brush.mask2rle(mask.astype(np.uint8) * 255)
    assert (decode_mask(rle, mask.shape[1], mask.shape[0]) == mask).all()


def test_decoder_reads_literal_runs_and_partial_alpha():
    # a hand-made stream with a literal token (first bit 0) of 8 values, as other encoders write
    values = np.array([0, 0, 0, 200, 9, 9, 9, 255], dtype=np.uint8)  # 2 RGBA pixels; alphas 200, 255
    header = f"{8:032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    body = "0" + "00" + f"{7:03b}" + "".join(f"{v:08b}" for v in values)
    bits = header + body
    bits += "0" * (-len(bits) % 8)
    rle = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    assert (sdk_brush.decode_rle(rle) == values).all()
    assert decode_mask(rle, 2, 1).tolist() == [[True, True]]


def test_malformed_rle_is_a_clear_error():
    good = encode_mask(np.ones((4, 4), bool))
    with pytest.raises(RleError, match="truncated"):
        decode_mask(good[:8], 4, 4)
    with pytest.raises(RleError, match="4 x 5"):
        decode_mask(good, 4, 5)
    with pytest.raises(RleError, match="0..255"):
        decode_mask([300, 1, 2, 3, 4, 5, 6, 7], 4, 4)
    with pytest.raises(RleError, match="header"):
        decode_mask([1, 2], 4, 4)
    with pytest.raises(RleError, match="byte values"):
        decode_mask(["a", "b"], 4, 4)


def test_full_size_mammogram_mask_is_fast():
    import time

    mask = np.zeros((4096, 3328), bool)
    mask[1000:1500, 200:900] = True
    start = time.perf_counter()
    rle = encode_mask(mask)
    back = decode_mask(rle, 3328, 4096)
    assert (back == mask).all()
    assert time.perf_counter() - start < 1.0


def test_both_label_configs_parse_and_name_their_image():
    screening = lc.parse_config(lc.SCREENING_CONFIG)
    assert (screening.kind, screening.image_name, screening.image_value) == (lc.SCREENING, "image", "image")
    assert screening.labels["roi"] == [lc.ROI_LABEL]
    review = lc.parse_config(lc.PATCH_REVIEW_CONFIG)
    assert (review.kind, review.image_name, review.image_value) == (lc.PATCH_REVIEW, "patch", "patch")
    assert screening.labels["assessment"] == review.labels["assessment"] == ["possibly malignant", "BI-RADS 1/2"]


def test_a_label_config_speaks_the_models_classes_and_the_images_name():
    from models.card import negative_class_name, positive_class_name

    meta = {"class_names": ["no finding", 'pneumonia "lobar"'], "positive_class": 1}
    positive, negative = positive_class_name(meta), negative_class_name(meta)
    assert (positive, negative) == ('pneumonia "lobar"', "no finding")
    assert negative_class_name({"class_names": ["a", "b", "c"], "positive_class": 0}) == "not a"
    for kind in (lc.SCREENING, lc.PATCH_REVIEW):
        config = lc.label_config(kind, positive=positive, negative=negative, subject="image")
        info = lc.parse_config(config)  # quotes in a class name are escaped, the XML stays valid
        assert info.labels["assessment"] == [positive, negative]
        assert "mammogram" not in config and "malignant" not in config
    choices = info.labels["assessment"]
    assert pr.assessment(0.7, 0.5, to_name="patch", choices=choices)["value"]["choices"] == [positive]
    assert pr.assessment(0.3, 0.5, to_name="patch", choices=choices)["value"]["choices"] == [negative]
    with pytest.raises(lc.LabelConfigError, match="unknown project kind"):
        lc.label_config("triage")


@pytest.mark.parametrize("config, match", [
    ("", "no label_config"),
    ("<View><Image", "not valid XML"),
    ('<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/>'
     '</Choices></View>', 'BrushLabels name="roi"'),
    (lc.SCREENING_CONFIG.replace('<Label value="ROI"', '<Label value="region"'), 'no "ROI" label'),
    (lc.SCREENING_CONFIG.replace('<Choice value="BI-RADS 1/2"/>', ''), 'choices of this label config are not two'),
])
def test_wrong_label_configs_are_refused_with_the_reason(config, match):
    with pytest.raises(lc.LabelConfigError, match=match):
        lc.parse_config(config)


def test_rectangles_are_percentages_of_the_displayed_image():
    r = pr.rectangle([100, 50, 200, 400], 1000, 800, label=lc.SUSPICIOUS_LABEL, to_name="image", score=0.9)
    assert r["value"]["x"] == pytest.approx(10.0) and r["value"]["y"] == pytest.approx(6.25)
    assert r["value"]["width"] == pytest.approx(20.0) and r["value"]["height"] == pytest.approx(50.0)
    assert (r["original_width"], r["original_height"], r["score"]) == (1000, 800, 0.9)
    clipped = pr.rectangle([900, 700, 200, 200], 1000, 800, label="x", to_name="image")
    assert clipped["value"]["width"] == pytest.approx(10.0) and clipped["value"]["height"] == pytest.approx(12.5)


def test_roi_mask_validation():
    mask = np.zeros((40, 30), bool)
    mask[5:10, 5:12] = True
    roi = pr.brush(mask, label=lc.ROI_LABEL, to_name="image", from_name="roi")
    assert (pr.roi_mask([roi], 30, 40) == mask).all()
    with pytest.raises(pr.RequestError, match="no ROI") as e:
        pr.roi_mask([], 30, 40)
    assert e.value.code == "no_roi"
    empty = pr.brush(np.zeros((40, 30), bool), label=lc.ROI_LABEL, to_name="image", from_name="roi")
    with pytest.raises(pr.RequestError, match="empty") as e:
        pr.roi_mask([empty], 30, 40)
    assert e.value.code == "empty_roi"
    with pytest.raises(pr.RequestError, match="30 x 40 image") as e:
        pr.roi_mask([roi], 60, 80)
    assert e.value.code == "roi_outside_image"
    broken = dict(roi, value=dict(roi["value"], rle=roi["value"]["rle"][:9]))
    with pytest.raises(pr.RequestError, match="malformed") as e:
        pr.roi_mask([broken], 30, 40)
    assert e.value.code == "malformed_rle"


def test_unit_region_ids_round_trip():
    rid = pr.unit_region_id(417, 12)
    assert pr.unit_of_region({"id": rid}) == 417
    assert pr.unit_of_region({"id": "abc123"}) is None


def test_roi_geometry_round_trips_through_the_concept_store_encoding():
    from workspace.dissect.concepts import decode_roi, encode_roi

    for mask in _masks():
        geometry = encode_roi(mask)
        assert (decode_roi(geometry) == mask).all() and geometry["area"] == int(mask.sum())


def test_roi_boxes_rasterise_echo_and_the_newest_is_asked():
    """The UI's ROI is a smart rectangle (``roi_box``): percentages of the image, rotated about its top-left
    corner; the backend echoes it, and a request holding a new box beside echoed ones asks the new one."""

    def box(x, y, w, h, rotation=0, rid="drawn"):
        return {"id": rid, "from_name": "roi_box", "to_name": "image", "type": "rectanglelabels",
                "original_width": 200, "original_height": 100,
                "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": ["ROI"]}}

    mask = pr.roi_mask([box(10, 20, 5, 30)], 200, 100)  # columns 20..29, rows 20..49
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max(), rows.min(), rows.max(), mask.sum()) == (20, 29, 20, 49, 300)
    turned = pr.roi_mask([box(50, 20, 5, 30, rotation=90)], 200, 100)  # 90 deg clockwise about (100, 20)
    rows, cols = np.nonzero(turned)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (70, 99, 20, 29)
    with pytest.raises(pr.RequestError) as e:
        pr.roi_mask([box(10, 20, 0, 0)], 200, 100)
    assert e.value.code == "empty_roi"
    echoed = pr.echo_rois([box(10, 20, 5, 30)], 41)
    assert echoed[0]["id"].startswith(pr.ECHO_PREFIX) and echoed[0]["value"]["rectanglelabels"] == ["ROI"]
    assert pr.echo_rois(echoed, 42) == []  # an echoed box is not echoed again
    assert pr.echo_rois([pr.brush(mask, label="ROI", to_name="image", from_name="roi")], 43) == []
    new = box(60, 10, 5, 5, rid="new")
    assert pr.asked_rois(echoed + [new]) == [new]
    assert pr.asked_rois(echoed) == echoed


def test_model_regions_are_outlines_over_a_see_through_inside():
    mask = np.zeros((300, 200), bool)
    mask[50:150, 40:160] = True
    unit = pr.brush(mask, label=lc.ALIGNED_LABEL, to_name="image")
    alpha = sdk_brush.decode_rle(unit["value"]["rle"]).reshape(300, 200, 4)[..., 3]
    assert alpha[100, 100] == pr.SEE_THROUGH_ALPHA and alpha[50, 100] == 255 and alpha[0, 0] == 0
    assert (decode_mask(unit["value"]["rle"], 200, 300) == mask).all()  # the same mask read back
    roi = pr.brush(mask, label=lc.ROI_LABEL, to_name="image", from_name="roi")
    assert set(np.unique(sdk_brush.decode_rle(roi["value"]["rle"]))) == {0, 255}  # the reader's ROI: solid
    patch = pr.rectangle([10, 10, 50, 50], 200, 300, label=lc.SUSPICIOUS_LABEL, to_name="image")
    assert patch["readonly"] is True  # a drag on a suspicious patch never moves it


def test_only_asked_for_alpha_levels_are_kept():
    ones = np.zeros((20, 30), np.uint8)
    ones[5:10, 5:20] = 1  # a 0/1 mask that happens to be uint8 is a mask, not alpha 1 (invisible)
    assert (decode_mask(encode_mask(ones), 30, 20) == ones.astype(bool)).all()
    assert set(np.unique(sdk_brush.decode_rle(encode_mask(ones)))) == {0, 255}
    levels = ones * 128
    assert set(np.unique(sdk_brush.decode_rle(encode_mask(levels, alpha=True)).reshape(20, 30, 4)[..., 3])) == {0, 128}
    with pytest.raises(RleError, match="uint8"):
        encode_mask(ones.astype(bool), alpha=True)


def test_secrets_come_from_the_environment_or_a_file(monkeypatch, tmp_path):
    from ml_backend import settings
    from workspace.base.errors import MammoError

    for name in (*settings.AUTH_USER, *settings.AUTH_PASSWORD, "BASIC_AUTH_PASS_FILE", "MAMMO_BACKEND_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert settings.auth() is None
    monkeypatch.setenv("BASIC_AUTH_USER", "reader")
    secret = tmp_path / "pass"
    secret.write_text("  s3cret  \nignored\n")
    monkeypatch.setenv("BASIC_AUTH_PASS_FILE", str(secret))
    assert settings.auth() == ("reader", "s3cret")
    monkeypatch.setenv("BASIC_AUTH_PASS", "from-env")   # the variable wins over the file
    assert settings.auth() == ("reader", "from-env")
    secret.write_text("\n")
    with pytest.raises(MammoError, match="is empty"):
        settings.secret_file(secret)
    with pytest.raises(MammoError, match="cannot read the secret file"):
        settings.secret_file(tmp_path / "missing")
    monkeypatch.setenv("LOG_LEVEL", "loud")
    with pytest.raises(MammoError, match="LOG_LEVEL"):
        settings.log_level()
