"""What a group of units does to the score: silence them at the dissected layer and finish the forward pass.

Silencing unit ``i`` sets its map (channel ``i`` of the dissected layer's output) to zero everywhere; the
rest of the network then runs on the silenced maps and gives the positive class's probability (the
score, ``LoadedModel.positive_probability``). A concept's effect on a score is that probability minus the
probability from the same maps with nothing silenced.

**Partial pass.** The layer's maps are computed once (a read keeps them: ``MammogramRead.maps``; for raw
patches :func:`silence_patches` taps them with ``models.features.capture``) and only the network from the
layer on runs per group: :func:`rest_of_network` traces the model with ``torch.fx`` (the dissected layer a
leaf) and keeps the part of the graph that depends on the layer's output alone. That holds for VGG
(``features.N`` ... ``classifier``) and for torchvision's ResNets and DenseNets at a block. Where the
trace fails (Python control flow on tensor values) or the rest of the network also reads something from
before the layer (a skip connection over it), the **fallback** is a forward hook on the layer that
replaces its output with the silenced maps: the same numbers, but the layers before it run again, so it
needs the patches' pixels and costs a whole forward pass per group. A layer that runs more than once in a
forward pass (a module reused inside a block) has no single output to silence: a :class:`ModelError`.

Groups are batched: each row of a batch is one (patch, group) pair, ``BATCH_BYTES`` of maps per batch.

**With a read** (:func:`read_silenced`, :func:`read_score_changes`) the results are cached on the read
object (``MammogramRead.silenced``, keyed by the sorted unit set and the patch), so a second report of the
same image with the same labels runs nothing: the read is already one image, model digest and layer.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from models.features import capture, get_layer, replacing
from workspace.base.errors import ModelError

if TYPE_CHECKING:
    from models.checkpoint import LoadedModel
    from models.inference import MammogramRead
    from workspace.base.config import Workspace

BATCH_BYTES = 32 << 20
"""float32 maps per batch of (patch, group) rows: 64 rows of the slim VGG's 128 x 32 x 32, 16 of VGG16's."""

Patches = torch.Tensor | Callable[[], torch.Tensor]
"""Intensities in [0, 1], (N, 1, size, size), or a function giving them (only called by the fallback)."""


# ----------------------------------------------------------------------------- the rest of the network
def _tracer(layer: str) -> fx.Tracer:
    """A ``torch.fx`` tracer that keeps the dissected layer as one node and traces into its parents."""

    class Tracer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            if qualified_name == layer:
                return True
            if layer.startswith(qualified_name + "."):
                return False  # a parent of the layer: traced into even where torch calls it a leaf
            return super().is_leaf_module(module, qualified_name)

    return Tracer()


def _trace_rest(model: nn.Module, layer: str) -> nn.Module | str:
    """The network from ``layer``'s output to the logits as a module of one input, or why there is none."""
    try:
        graph = _tracer(layer).trace(model)
    except Exception as error:  # noqa: BLE001 - any failure to trace means "use the hook"
        return f"the model cannot be traced ({type(error).__name__})"
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        return f"layer {layer!r} runs {len(calls)} times in the traced graph"
    start = calls[0]
    output = next(n for n in graph.nodes if n.op == "output")
    needed: set[fx.Node] = set()
    stack = [output]
    while stack:  # every node the output needs, stopping at the layer
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node is start:
            continue
        if node.op == "placeholder":
            return "the layers after it also read the network's input (a connection around the layer)"
        stack.extend(node.all_input_nodes)
    rest = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: rest.placeholder("maps")}
    for node in graph.nodes:
        if node in needed and node is not start:
            env[node] = rest.node_copy(node, lambda n: env[n])
    rest.lint()
    return fx.GraphModule(model, rest)


_RESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> {layer: module or reason}
_RESTS_LOCK = threading.Lock()


def rest_of_network(model: nn.Module, layer: str) -> nn.Module | None:
    """The network from ``layer`` on (maps -> logits, sharing the model's weights), or None where only the
    hook fallback works (:func:`fallback_reason` says why). Traced once per model and layer."""
    get_layer(model, layer)  # a clear error for a layer the model does not have
    with _RESTS_LOCK:
        known = _RESTS.setdefault(model, {})
        if layer not in known:
            known[layer] = _trace_rest(model, layer)
        rest = known[layer]
    return rest if isinstance(rest, nn.Module) else None


def fallback_reason(model: nn.Module, layer: str) -> str | None:
    """Why the rest of the network cannot run alone (None: it can)."""
    rest_of_network(model, layer)
    with _RESTS_LOCK:
        reason = _RESTS[model][layer]
    return reason if isinstance(reason, str) else None


# ------------------------------------------------------------------------------------------ silencing
def keep_masks(groups: Sequence[Iterable[int]], n_units: int, layer: str = "the layer") -> torch.Tensor:
    """(groups, units) float32: 0 for the units of each group, 1 elsewhere; a unit outside the layer is a
    :class:`ModelError` naming it."""
    keep = torch.ones((len(groups), n_units), dtype=torch.float32)
    for g, units in enumerate(groups):
        idx = [int(u) for u in units]
        outside = sorted({u for u in idx if not 0 <= u < n_units})
        if outside:
            raise ModelError(f"unit(s) {outside[:5]} are outside {layer}, whose units are 0..{n_units - 1}: "
                             "labels of another model or layer?")
        keep[g, idx] = 0.0
    return keep


def _rows_per_batch(unit_shape: Sequence[int], bytes_per_value: int = 4) -> int:
    return max(1, BATCH_BYTES // max(1, int(np.prod(unit_shape)) * bytes_per_value))


@torch.inference_mode()
def silenced_scores(loaded: LoadedModel, maps: np.ndarray | torch.Tensor, groups: Sequence[Iterable[int]], *,
                    patches: Patches | None = None) -> np.ndarray:
    """(groups, N) float32: the score of each patch with each group's units silenced.

    ``maps`` (N, units, h, w): the dissected layer's output for the patches (float16 or float32, e.g. a
    read's memory-mapped maps); an empty group gives the score of the maps as they are. ``patches``: the same
    patches' intensities, needed only where :func:`rest_of_network` is None (the hook fallback)."""
    if np.ndim(maps) != 4:
        raise ModelError(f"maps must be (patches, units, h, w), not shape {tuple(np.shape(maps))}")
    n, n_units = int(maps.shape[0]), int(maps.shape[1])
    layer = loaded.dissected_layer
    keep = keep_masks(groups, n_units, f"layer {layer}").to(loaded.device)
    n_groups = len(keep)
    out = np.empty((n_groups, n), dtype=np.float32)
    if n == 0 or n_groups == 0:
        return out
    rest = rest_of_network(loaded.model, layer)
    if rest is None and patches is None:
        raise ModelError(f"silencing units at {layer} needs the patches' pixels: "
                         f"{fallback_reason(loaded.model, layer)}")
    x01 = None if rest is not None else (patches() if callable(patches) else patches)
    if x01 is not None and len(x01) != n:
        raise ModelError(f"{len(x01)} patches for {n} maps")
    per = max(1, _rows_per_batch(maps.shape[1:]) // n_groups)  # patches per batch, all groups of each
    for start in range(0, n, per):
        chunk = maps[start:start + per]
        chunk = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))  # memmap: read here
        # channels_last as the network runs (a later layout change of the rows would cost more than the rest
        # of the network), float32, one copy
        chunk = chunk.to(device=loaded.device, dtype=torch.float32, memory_format=torch.channels_last)
        p, shape = len(chunk), tuple(chunk.shape[1:])
        silenced = torch.empty((p * n_groups, *shape), dtype=torch.float32, device=loaded.device,
                               memory_format=torch.channels_last)
        # rows patch-major, the groups of one patch side by side
        torch.mul(chunk[:, None], keep[None, :, :, None, None], out=silenced.view(p, n_groups, *shape))
        if rest is not None:
            logits = rest(silenced)
        else:
            x = x01[start:start + per].repeat_interleave(n_groups, dim=0)
            logits = _forward_replacing(loaded, layer, x, silenced)
        probs = loaded.positive_probability(logits).reshape(len(chunk), n_groups)
        out[:, start:start + len(chunk)] = probs.T.cpu().numpy()
    return out


def _forward_replacing(loaded: LoadedModel, layer: str, x01: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The whole forward pass with ``layer``'s output replaced by ``maps`` (the fallback)."""
    def silenced(output: torch.Tensor) -> torch.Tensor:
        if output.shape != maps.shape:
            raise ModelError(f"layer {layer!r} gives maps of shape {tuple(output.shape)} here, not the "
                             f"{tuple(maps.shape)} silenced")
        return maps.to(output.dtype)

    with replacing(loaded.model, layer, silenced) as hook:
        logits = loaded.model(loaded.preprocess(x01))
    if hook.calls != 1:
        raise ModelError(f"layer {layer!r} runs {hook.calls} times in one forward pass: its units have no one map "
                         "to silence (dissect a layer that runs once)")
    return logits


@torch.inference_mode()
def tap_layer(loaded: LoadedModel, x01: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """One forward pass of raw patches (N, 1, size, size) in [0, 1]: ``(scores (N,), the layer's maps)``."""
    with capture(loaded.model, loaded.dissected_layer) as tap:
        logits = loaded.model(loaded.preprocess(x01))
    return loaded.positive_probability(logits).cpu().numpy(), tap.output


def silence_patches(loaded: LoadedModel, x01: torch.Tensor, groups: Sequence[Iterable[int]]) \
        -> tuple[np.ndarray, np.ndarray]:
    """For raw patches (N, 1, size, size) in [0, 1]: ``(scores (N,), silenced (groups, N))``. The model runs up
    to the layer once (a whole forward pass, which also gives the scores), then the rest once per group."""
    scores, maps = tap_layer(loaded, x01)
    return scores, silenced_scores(loaded, maps, groups, patches=x01)


# ------------------------------------------------------------------------------------------ with a read
def _unit_key(units: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted({int(u) for u in units}))


def read_silenced(ws: Workspace | None, loaded: LoadedModel, read: MammogramRead,
                  groups: Sequence[Iterable[int]], *, index: int | None = None) -> np.ndarray:
    """(groups, patches) scores of a read's patches (``index``: that patch only, one column) with each group
    silenced, from the read's maps; cached on the read (key: the group's sorted units and the patch). ``ws``
    is needed only by the hook fallback, which reads the image's pixels again."""
    if read.model_digest != loaded.digest or read.layer != loaded.dissected_layer:
        raise ModelError(f"the read of {read.image_id} is model {read.model_digest} at {read.layer}, not "
                         f"{loaded.digest} at {loaded.dissected_layer}")
    if read.maps is None:
        raise ModelError(f"the read of {read.image_id} kept no maps: read it with keep_maps=True")
    n = len(read.scores)
    if index is not None and not 0 <= int(index) < n:
        raise ModelError(f"the read of {read.image_id} has no patch {index} (it has {n})")
    keys = [_unit_key(g) for g in groups]
    if n == 0:
        return np.empty((len(keys), 0), np.float32)
    keep_masks(keys, int(read.maps.shape[1]), f"layer {read.layer}")  # checked before any cache lookup

    def cached(key: tuple[int, ...]) -> np.ndarray | None:
        whole = read.silenced.get((key, None))
        if index is None or whole is not None:
            return whole if index is None else whole[[int(index)]]
        return read.silenced.get((key, int(index)))

    missing = [k for k in dict.fromkeys(keys) if cached(k) is None]
    if missing:
        rows = slice(None) if index is None else [int(index)]
        patches = None if ws is None else (lambda: _read_patches(ws, read, rows))
        scores = silenced_scores(loaded, read.maps if index is None else read.maps[[int(index)]], missing,
                                 patches=patches)
        for key, row in zip(missing, scores, strict=True):
            read.silenced[(key, None if index is None else int(index))] = row
    return np.stack([cached(k) for k in keys]) if keys else np.empty((0, n if index is None else 1), np.float32)


def _read_patches(ws: Workspace, read: MammogramRead, rows: Any) -> torch.Tensor:
    from models.inference import _load_pixels
    from workspace.base.catalog import get_image, open_catalog

    db = open_catalog(ws)
    try:
        pixels = _load_pixels(ws, dict(get_image(db, read.image_id)))
    finally:
        db.conn.close()
    boxes = np.asarray(read.boxes)[rows]
    return torch.from_numpy(np.ascontiguousarray(np.stack([pixels[y:y + h, x:x + w] for x, y, w, h in boxes])[:, None]))


@dataclass
class ScoreChanges:
    """What silencing each group does to a read's score: of the image (``of="image"``: the image score, the
    aggregate of its patch scores) or of one patch (``of="patch"``). Groups keep the caller's keys."""

    of: str
    score: float                # from the kept maps, nothing silenced (the read's score within float16 rounding)
    silenced: dict[Any, float]  # per group, the same score with the group's units silenced

    @property
    def changes(self) -> dict[Any, float]:
        """Per group: silenced minus as read (negative: the group's units pushed the score up)."""
        return {key: value - self.score for key, value in self.silenced.items()}


def read_score_changes(ws: Workspace | None, loaded: LoadedModel, read: MammogramRead,
                       groups: Mapping[Any, Iterable[int]], *, index: int | None = None) -> ScoreChanges:
    """Each group's change of the image score (``index`` None: ``models.inference.image_score_of`` over the
    silenced patch scores, so the highest patch may change) or of patch ``index``'s score. Both sides come
    from the read's maps, so their float16 rounding cancels out."""
    from models.inference import image_score_of

    keys = list(groups)
    rows = read_silenced(ws, loaded, read, [(), *(groups[k] for k in keys)], index=index)
    if index is None:
        return ScoreChanges(of="image", score=image_score_of(rows[0]),
                            silenced={k: image_score_of(r) for k, r in zip(keys, rows[1:], strict=True)})
    return ScoreChanges(of="patch", score=float(rows[0, 0]),
                        silenced={k: float(r[0]) for k, r in zip(keys, rows[1:], strict=True)})


__all__ = ["BATCH_BYTES", "rest_of_network", "fallback_reason", "keep_masks", "silenced_scores", "tap_layer",
           "silence_patches",
           "read_silenced", "ScoreChanges", "read_score_changes"]
