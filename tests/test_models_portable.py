"""A recorded synthetic split is accepted on a CPU with other SIMD paths than the one that recorded it.

The generator's float32 maths (numpy's exp, sin, arctan ...; torch's resampling) dispatches to
CPU-specific SIMD kernels, so on another x86-64 CPU a few pixels land one stored grey level apart. Here
the other CPU is this one with numpy's and torch's dispatch restricted to the baseline
(``NPY_DISABLE_CPU_FEATURES``, ``ATEN_CPU_CAPABILITY=default``) in a subprocess: it redraws patches of a
few patients recorded by the parent process, and the fingerprint rule accepts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.data import (
    compare_to_recorded,
    encode_fingerprint,
    pixel_digest,
    pixel_fingerprint,
    rebuild_recorded_split,
)
from workspace.base.errors import MammoError
from workspace.data.synth import GENERATOR_VERSION

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1024, 768)
PATCH = 256
REDRAW = """
import json, sys
import numpy as np
from models.data import compare_to_recorded, rebuild_recorded_split
recorded = json.load(open(sys.argv[1]))
data = rebuild_recorded_split(recorded, folder=sys.argv[2])
print(json.dumps(compare_to_recorded(data, np.arange(len(data)), recorded)))
"""


def _restricted_env() -> dict[str, str]:
    """The environment of a process whose numpy and torch use baseline x86-64 kernels only."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    env = dict(os.environ)
    env["NPY_DISABLE_CPU_FEATURES"] = " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))
    env["ATEN_CPU_CAPABILITY"] = "default"
    env["PYTHONPATH"] = str(REPO)
    return env


def _record(folder: Path) -> dict:
    """A recorded split: 4 patches covering most of each of 6 images of 3 patients, drawn here."""
    corners = [(0, 0), (PATCH, 256), (2 * PATCH, 512), (0, 768)]
    patches = [[patient, key, x, y, 1] for patient in (1, 4, 7) for key in ("LCC", "RMLO") for x, y in corners]
    recorded = {"split": "test", "generator": "workspace.data.synth", "generator_version": GENERATOR_VERSION,
                "seed": 0, "size": PATCH, "image_shape": list(SHAPE), "patches": patches}
    data = rebuild_recorded_split(recorded, folder=folder)
    positions = np.arange(len(data))
    return {**recorded, "pixel_digest": pixel_digest(data, positions),
            "pixel_fingerprint": encode_fingerprint(pixel_fingerprint(data, positions))}


def test_a_split_recorded_here_is_accepted_with_simd_dispatch_restricted(tmp_path):
    recorded = _record(tmp_path)
    record_file = tmp_path / "recorded.json"
    record_file.write_text(json.dumps(recorded))
    done = subprocess.run([sys.executable, "-c", REDRAW, str(record_file), str(tmp_path)], env=_restricted_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["accepted"], result
    # the rule's bound holds with room to spare (a real change moves blocks by far more than 1 grey level)
    assert result["max_block_difference"] <= 0.5, result
    print(f"restricted dispatch: bit-identical {result['bit_identical']}, largest block difference "
          f"{result['max_block_difference']:.4f} grey levels, {result['blocks_differing']:.2%} of blocks differ")


def test_the_rule_refuses_other_pixels(tmp_path):
    recorded = _record(tmp_path)
    # the same images, every patch one pixel aside: what a changed generator or a wrong record looks like
    moved = dict(recorded, patches=[[p, k, x + 1 if x == 0 else x - 1, y, lab]
                                    for p, k, x, y, lab in recorded["patches"]])
    data = rebuild_recorded_split(moved, folder=tmp_path)
    result = compare_to_recorded(data, np.arange(len(data)), recorded)
    assert not result["accepted"] and not result["bit_identical"]
    assert result["max_block_difference"] > 1
    # without a fingerprint the record is judged by its digest alone
    digest_only = {k: v for k, v in recorded.items() if k != "pixel_fingerprint"}
    assert compare_to_recorded(data, np.arange(len(data)), digest_only)["accepted"] is False
    outside = dict(recorded, patches=[[1, "LCC", SHAPE[1] - PATCH + 1, 0, 1]])
    with pytest.raises(MammoError, match="does not fit"):
        rebuild_recorded_split(outside, folder=tmp_path)
