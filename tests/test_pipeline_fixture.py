"""The shared pipeline is coherent: reads, run and catalog agree (the other areas build on it)."""

import numpy as np


def test_pipeline_read_and_run_agree(pipeline):
    from models.inference import read_mammogram
    from workspace.app.demo_check import lesion_boxes
    from workspace.base.catalog import get_image, open_catalog

    run = pipeline.run
    assert run.max_activations.shape == (run.n_units, len(run.patch_ids))
    assert run.thresholds.shape == (run.n_units,)
    assert run.model_digest == pipeline.loaded.digest
    image_id = pipeline.lesion_image_ids[0]
    read = read_mammogram(pipeline.ws, image_id, pipeline.loaded)
    assert read.cached   # the fixture read it already
    assert read.maps is not None and read.maps.shape[1] == run.n_units
    assert np.all((read.scores >= 0) & (read.scores <= 1))
    image = get_image(open_catalog(pipeline.ws), image_id)
    boxes = lesion_boxes(pipeline.ws, image_id)
    assert boxes and all(w > 0 and h > 0 and 0 <= x and x + w <= image["cols"] and 0 <= y and y + h <= image["rows"]
                         for x, y, w, h in boxes)
