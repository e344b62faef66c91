"""The checkpoint format: one ``.pt`` file holding the weights and everything needed to use them.

Our own checkpoints are a dict ``{"format": FORMAT, "state_dict": ..., "meta": {...}}`` written with
``torch.save`` and read back with ``weights_only=True`` (no code runs at load). ``meta`` holds:
``architecture``, ``dissected_layer``, ``input_size``, ``in_channels``, ``normalisation`` {mean, std},
``class_names``, ``recipe`` (every training hyperparameter), ``data_digest`` (the patch set's digest),
``data`` (patch set name, synthetic seed and patient range), ``split`` (patients/patches per split),
``operating_point`` {threshold, rule, ...}, ``metrics`` and ``torch_version``.

Any other torchvision-style CNN can be loaded for dissection too (the method is domain-agnostic):
- a state_dict file (or a dict with ``state_dict``/``model``) plus ``arch="torchvision:resnet18"``
  (any ``torchvision.models`` name; built with ``weights=None``, so nothing is downloaded; the class
  count and a 1-channel first convolution are taken from the state_dict) or ``arch="vgg16_slim"``;
- a whole pickled ``nn.Module`` only with ``trust=True`` (unpickling runs code from the file).
Either way ``layer`` names the layer to dissect (see :func:`models.features.layer_names`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.card import ModelCard, negative_class_name, positive_class_name, with_card
from models.device import pick_device
from models.features import get_layer
from models.vgg import ARCHITECTURES, CLASS_NAMES, DISSECTED_LAYER, build_vgg
from workspace.base.errors import ModelError

FORMAT = "mammo-dissect-checkpoint/1"
SHIPPED_DEMO = Path(__file__).resolve().parent / "weights" / "slim_demo.pt"
DEFAULT_NORMALISATION = {"mean": 0.5, "std": 0.5}
DEFAULT_INPUT_SIZE = 512
DEFAULT_OPERATING_POINT = 0.5


def file_digest(path: str | os.PathLike) -> str:
    """sha1 of the file's bytes, 16 hex digits: the model's identity everywhere (reads, runs, labels)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A network in eval mode on ``device`` with its metadata and file digest."""

    model: nn.Module
    meta: dict[str, Any]
    digest: str
    path: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    load_options: dict[str, Any] = field(default_factory=dict)  # arch, trust, class options it was loaded with

    @property
    def architecture(self) -> str:
        return self.meta["architecture"]

    @property
    def dissected_layer(self) -> str:
        return self.meta["dissected_layer"]

    @property
    def input_size(self) -> int:
        return int(self.meta.get("input_size", DEFAULT_INPUT_SIZE))

    @property
    def card(self) -> ModelCard:
        """What the model was trained on and how well it did: shown beside every score."""
        return ModelCard.from_meta(self.meta, fallback_name=self.path.stem)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or CLASS_NAMES)

    @property
    def positive_index(self) -> int:
        """The class whose probability is the score (``meta["positive_class"]``; default class 1, our
        "possibly malignant (BI-RADS 0)")."""
        return int(self.meta.get("positive_class", 1))

    @property
    def positive_name(self) -> str:
        """The scored class in a few words (``models.card.positive_class_name``): "possibly malignant"."""
        return positive_class_name(self.meta)

    @property
    def negative_name(self) -> str:
        """The answer below the operating point (``models.card.negative_class_name``): "BI-RADS 1/2"."""
        return negative_class_name(self.meta)

    @property
    def score_label(self) -> str:
        """How every surface names a score: ``P(possibly malignant)``, ``P(pneumonia)``..."""
        return f"P({self.positive_name})"

    def positive_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits)[:, positive class], float32."""
        return torch.softmax(logits.float(), dim=1)[:, self.positive_index]

    @property
    def operating_point(self) -> float:
        """The score at or above which a patch is called suspicious (chosen on validation)."""
        op = self.meta.get("operating_point") or {}
        return float(op.get("threshold", DEFAULT_OPERATING_POINT))

    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        """Intensities in [0, 1], (B, 1, H, W) -> the network's input on its device (normalised,
        channels repeated when the network wants more than one)."""
        return normalise(x01, self.meta.get("normalisation", DEFAULT_NORMALISATION), self.device,
                         channels=int(self.meta.get("in_channels", 1)))

    @torch.inference_mode()
    def predict_proba(self, x01: torch.Tensor) -> torch.Tensor:
        """The score (the positive class's probability) per patch, a CPU float32 tensor (B,)."""
        return self.positive_probability(self.model(self.preprocess(x01))).cpu()


def normalise(x01: torch.Tensor, normalisation: dict, device: torch.device | str,
              channels: int = 1) -> torch.Tensor:
    """(x - mean) / std on ``device``, channels_last, the grey channel repeated to ``channels``: the
    network input in training and inference alike."""
    x = (x01.to(device, torch.float32) - float(normalisation["mean"])) / float(normalisation["std"])
    if channels != x.shape[1]:
        x = x.expand(-1, channels, -1, -1)
    return x.contiguous(memory_format=torch.channels_last)


def class_options(class_names: str | None, positive_class: str | None) -> dict[str, Any]:
    """``meta`` overrides from the ``--class-names A,B`` and ``--positive-class NAME|INDEX`` options, checked:
    a site's CNN names its own classes and which one is the score."""
    meta: dict[str, Any] = {}
    names = [n.strip() for n in class_names.split(",")] if class_names else None
    if names is not None:
        if len(names) < 2 or any(not n for n in names):
            raise ModelError(f"--class-names wants two or more comma-separated names, got {class_names!r}")
        meta["class_names"] = names
    if positive_class is not None:
        known = names or list(CLASS_NAMES)
        if positive_class.isdigit() and int(positive_class) < len(known):
            meta["positive_class"] = int(positive_class)
        elif positive_class in known:
            meta["positive_class"] = known.index(positive_class)
        else:
            raise ModelError(f"--positive-class {positive_class!r} is none of the classes {known}")
    elif names is not None:
        meta["positive_class"] = len(names) - 1
    return meta


def malignant_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(possibly malignant) = softmax(logits)[:, 1] (class 1 of :data:`models.vgg.CLASS_NAMES`), float32."""
    return torch.softmax(logits.float(), dim=1)[:, 1]


def base_meta(arch: str, **extra: Any) -> dict[str, Any]:
    """The metadata every checkpoint of ``arch`` starts from."""
    meta: dict[str, Any] = {
        "architecture": arch,
        "dissected_layer": DISSECTED_LAYER,
        "input_size": DEFAULT_INPUT_SIZE,
        "in_channels": 1,
        "normalisation": dict(DEFAULT_NORMALISATION),
        "class_names": list(CLASS_NAMES),
        "torch_version": torch.__version__,
    }
    meta.update(extra)
    return meta


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> str:
    """Write the checkpoint atomically; return its digest. ``meta`` must be JSON-serialisable."""
    for key in ("architecture", "dissected_layer"):
        if key not in meta:
            raise ModelError(f"checkpoint metadata needs {key!r}")
    meta = json.loads(json.dumps(meta))  # plain types only, so weights_only loading accepts it
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)
    return file_digest(path)


def _read(path: Path, trust: bool) -> Any:
    if not path.is_file():
        raise ModelError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds; the user needs one message
        if not trust and "Unsupported global" in str(error):
            raise ModelError(f"{path} holds pickled code (a whole model?); load it only if you trust the "
                             "file, with --trust") from None
        raise ModelError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None


def _extract_state_dict(blob: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(blob, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
        if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
            # weights saved from DataParallel carry a "module." prefix
            return {k.removeprefix("module."): v for k, v in blob.items()}
    raise ModelError(f"{path} is not a state_dict (a dict of tensors)")


def _build_torchvision(name: str, state: dict[str, torch.Tensor]) -> tuple[nn.Module, int]:
    """torchvision.models.<name> with weights=None, adapted to the state_dict's classes and input channels."""
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise ModelError(f"torchvision has no model {name!r}") from None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears and f"{linears[-1][0]}.weight" in state:
        classes = state[f"{linears[-1][0]}.weight"].shape[0]
        if classes != linears[-1][1].out_features:
            model = torchvision.models.get_model(name, weights=None, num_classes=classes)
    in_channels = 3
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and f"{convs[0][0]}.weight" in state:
        first_name, first = convs[0]
        in_channels = state[f"{first_name}.weight"].shape[1]
        if in_channels != first.in_channels:
            replacement = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                                    first.padding, first.dilation, first.groups, first.bias is not None)
            parent_name, _, attr = first_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)
    return model, int(in_channels)


def _first_conv_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return 1


def _check_classes(model: nn.Module, info: dict[str, Any], path: Path) -> None:
    """The class names fit the network's output, and the positive class is one of them."""
    names = info.get("class_names") or list(CLASS_NAMES)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears and linears[-1].out_features != len(names):
        raise ModelError(f"{path.name} outputs {linears[-1].out_features} classes but {len(names)} class names are "
                         f"given ({names}): name them with --class-names")
    positive = int(info.get("positive_class", 1))
    if not 0 <= positive < len(names):
        raise ModelError(f"positive class {positive} is not one of the {len(names)} classes {names}")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None, *,
                    arch: str | None = None, layer: str | None = None, trust: bool = False,
                    meta: dict[str, Any] | None = None) -> LoadedModel:
    """Load a checkpoint for inference (eval mode, on ``device`` or :func:`pick_device`).

    Our own files need no other argument. Foreign files need ``arch`` (``vgg16_1ch``, ``vgg16_slim`` or
    ``torchvision:NAME``) unless they are whole pickled modules (``trust=True``), and ``layer``
    unless the default ``features.29`` exists. ``meta`` overrides metadata fields (e.g. normalisation).
    """
    path = Path(path)
    blob = _read(path, trust)
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        info = dict(blob["meta"])
        model = build_vgg(info["architecture"], num_classes=len(info.get("class_names", CLASS_NAMES)),
                          in_channels=int(info.get("in_channels", 1)))
        model.load_state_dict(blob["state_dict"])
    elif isinstance(blob, nn.Module):
        model = blob
        info = base_meta(arch or f"module:{type(blob).__name__}", in_channels=_first_conv_channels(model))
    else:
        if not arch:
            raise ModelError(f"{path} is a plain state_dict: say which architecture it is "
                             "(--arch vgg16_slim, vgg16_1ch or torchvision:NAME)")
        state = _extract_state_dict(blob, path)
        if arch.startswith("torchvision:"):
            model, in_channels = _build_torchvision(arch.split(":", 1)[1], state)
        elif arch in ARCHITECTURES:
            in_channels = int(state["features.0.weight"].shape[1]) if "features.0.weight" in state else 1
            model = build_vgg(arch, in_channels=in_channels)
        else:
            raise ModelError(f"unknown architecture {arch!r}; use vgg16_1ch, vgg16_slim or torchvision:NAME")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ModelError(f"{path} does not fit {arch}: {str(error).splitlines()[0]}") from None
        info = base_meta(arch, in_channels=in_channels)
    digest = file_digest(path)
    info = with_card(info, path, digest)
    if layer:
        info["dissected_layer"] = layer
    if meta:
        info.update(meta)
    get_layer(model, info["dissected_layer"])  # a clear error now rather than at dissection time
    _check_classes(model, info, path)
    device = torch.device(device) if device is not None else pick_device()
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    options = {k: v for k, v in (("arch", arch), ("trust", trust)) if v}
    options.update({k: meta[k] for k in ("class_names", "positive_class") if meta and k in meta})
    return LoadedModel(model=model, meta=info, digest=digest, path=path.resolve(), device=device,
                       load_options=options)


def resolve_model_path(ws: Any, spec: str | os.PathLike | None) -> Path:
    """A model given on the command line: a file path, a model name in the workspace
    (``ws.models_dir/NAME/model.pt``), or nothing for the shipped demo model."""
    if spec is None or str(spec) in ("", "demo"):
        if not SHIPPED_DEMO.is_file():
            raise ModelError(f"the shipped demo model {SHIPPED_DEMO} is missing; train one with `mammo train`")
        return SHIPPED_DEMO
    candidate = Path(spec)
    if candidate.is_file():
        return candidate
    named = Path(ws.models_dir) / str(spec) / "model.pt"
    if named.is_file():
        return named
    raise ModelError(f"no model {str(spec)!r}: neither a file nor a trained model in {ws.models_dir}")


def register_model(db: Any, loaded: LoadedModel, name: str | None = None) -> None:
    """Record the model in the catalog's ``models`` table, with the options it must be loaded with again
    (``load_options``: a foreign state_dict's ``arch``, ``trust`` for a pickled module)."""
    from workspace.base.schema import utc_now

    options = json.dumps(loaded.load_options, sort_keys=True) if loaded.load_options else None
    db["models"].insert({
        "model_digest": loaded.digest,
        "name": name or loaded.meta.get("name") or loaded.path.stem,
        "architecture": loaded.architecture,
        "dissected_layer": loaded.dissected_layer,
        "path": str(loaded.path),
        "metrics": json.dumps(loaded.meta.get("metrics", {})),
        "load_options": options,
        "created_at": utc_now(),
    }, pk="model_digest", ignore=True)  # the digest fixes the file, so an existing row is current
    if options:  # a row made before the options were known (or by an older version) learns them
        db.execute("UPDATE models SET load_options = ? WHERE model_digest = ? AND load_options IS NULL",
                   [options, loaded.digest])


__all__ = ["class_options", "FORMAT", "SHIPPED_DEMO", "DEFAULT_NORMALISATION", "LoadedModel", "file_digest", "base_meta",
           "normalise", "malignant_probability",
           "save_checkpoint", "load_checkpoint", "resolve_model_path", "register_model"]
