"""``mammo fiftyone sync`` on the shared real pipeline (real model, real patches, real dissection run)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.fiftyone, pytest.mark.slow]


def test_real_run_synced_with_model_scores_and_masks(fo_pipeline, pipeline):
    import torch
    from fiftyone import ViewField as F

    from models.features import capture
    from workspace.data.patches import open_patch_set
    from workspace.dissect.dissection import unit_masks

    run, patches, neurons = fo_pipeline.run, fo_pipeline.patches, fo_pipeline.neurons
    assert len(patches) == len(run.patch_ids) and len(neurons) == run.n_units
    assert patches.info["mammo"]["run_id"] == run.run_id
    # a unit's best patch carries that unit's mask: the thresholded, upsampled map of the real model
    unit = int(np.argmax(run.top_k_values[:, 0]))
    best = int(run.top_k[unit, 0])
    sample = patches.match(F("patch_id") == best).first()
    det = next(d for d in sample.unit_masks.detections if d.unit == unit)
    assert det.rank == 1
    patch_set = open_patch_set(pipeline.ws, run.manifest["patch_set"])
    x = patch_set.batch([next(r for r in patch_set.rows if r["patch_id"] == best)["array_index"]])
    loaded = pipeline.loaded
    with torch.inference_mode(), capture(loaded.model, run.layer) as tap:
        score = torch.softmax(loaded.model(loaded.preprocess(x)).float(), dim=1)[0, 1].item()
    mask = unit_masks(tap.output[0, [unit]].float().cpu().numpy(), run.thresholds[[unit]], 64)[0]
    ys, xs = np.nonzero(mask)
    assert det.bounding_box == pytest.approx([xs.min() / 64, ys.min() / 64, (xs.max() + 1 - xs.min()) / 64,
                                              (ys.max() + 1 - ys.min()) / 64])
    # the model's score and the run's max activations of that patch
    assert sample.prediction.confidence == pytest.approx(score, abs=1e-4)
    column = int(np.flatnonzero(run.patch_ids == best)[0])
    assert sample.max_activations == pytest.approx(run.max_activations[:, column].tolist(), rel=1e-6)
    # the unit's montage is a picture of its top-k patches, best first
    montage = neurons.match(F("unit") == unit).first()
    with Image.open(montage.filepath) as image:
        assert image.width >= 128 * int(np.ceil(np.sqrt(run.top_k.shape[1])))
    assert montage.top_patch_ids == [int(p) for p in run.top_k[unit]]


def test_the_neuron_map_is_a_fiftyone_visualization_and_the_layout_is_saved(fo_pipeline):
    """A curator's own App on the shared database (no launcher of ours) gets the neuron map in FiftyOne's
    own Embeddings panel and the saved layout from the dataset itself."""
    import fiftyone as fo

    from fiftyone_plugins.sync import NEURON_MAP_KEY, WORKSPACE_NAME

    neurons = fo.load_dataset(fo_pipeline.neurons.name)   # as another process would open it
    assert NEURON_MAP_KEY in neurons.list_brain_runs()
    results = neurons.load_brain_results(NEURON_MAP_KEY)
    units = np.asarray(neurons.values("unit"))
    np.testing.assert_allclose(results.points, fo_pipeline.run.pca[units], rtol=1e-6)
    assert results.sample_ids is None or list(results.sample_ids) == neurons.values("id")
    assert WORKSPACE_NAME in neurons.list_workspaces()
    layout = neurons.load_workspace(WORKSPACE_NAME)
    panels = {child.type: child for child in layout.children}
    assert set(panels) == {"Samples", "Embeddings"}
