"""Reading weight files: timm's loader, safely, plus the one key mapping timm lacks (EfficientNet-PyTorch)."""
from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
from torch import nn

__all__ = ["load_checkpoint", "load_into", "remap_efficientnet_pytorch_keys"]


def _stage_locations(stage_depths: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]


# EfficientNet-PyTorch parameter groups -> timm names. Blocks without an expansion conv are
# timm DepthwiseSeparableConv, the others InvertedResidual.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def remap_efficientnet_pytorch_keys(
    state_dict: Mapping[str, torch.Tensor], stage_depths: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (``_conv_stem``, ``_blocks.3._expand_conv`` ...) to timm's.

    Args:
        state_dict: EfficientNet-PyTorch-named tensors (no squeeze-excitation, as in EfficientNet-Lite).
        stage_depths: blocks per stage; the default is EfficientNet-Lite0's.

    Raises:
        ValueError: a key has no timm counterpart, or there are more blocks than stage_depths holds.
    """
    locations = _stage_locations(stage_depths)
    expanded = {int(k.split(".")[1]) for k in state_dict if re.match(r"_blocks\.\d+\._expand_conv\.", k)}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 3:
            block = int(parts[1])
            names = _EFFNET_IR_BLOCK if block in expanded else _EFFNET_DS_BLOCK
            if block >= len(locations) or parts[2] not in names:
                raise ValueError(f"cannot map EfficientNet-PyTorch key {key!r} for stage depths {stage_depths}")
            stage, index = locations[block]
            out[".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])] = value
        elif parts[0] in _EFFNET_TOP:
            out[".".join([_EFFNET_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"cannot map EfficientNet-PyTorch key {key!r} to a timm name")
    return out


def load_checkpoint(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a state dict with timm's loader, safely (``torch.load(weights_only=True)``).

    timm's ``load_state_dict`` reads ``.safetensors`` and ``torch.save`` files, picks the EMA
    weights (``state_dict_ema``, ``model_ema``) over ``state_dict`` and ``model`` wrappers, and
    strips ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes. EfficientNet-
    PyTorch key names are then mapped to timm's.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt, holds arbitrary pickled objects, or is not a state dict.
    """
    import timm.models

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    resave = "save the weights with torch.save(model.state_dict(), path)"
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except (AttributeError, TypeError) as err:  # timm's key cleaning needs a mapping
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors); {resave}") from err
    except Exception as err:  # timm re-raises torch.load's UnpicklingError as a RuntimeError
        refused = err if isinstance(err, pickle.UnpicklingError) else err.__cause__
        if isinstance(refused, pickle.UnpicklingError) and "global" in str(refused).lower():
            raise ValueError(
                f"{path} pickles objects other than tensors, which torch.load(weights_only=True) refuses; "
                "if you trust the file, re-save it with torch.save(model.state_dict(), path)"
            ) from err
        # random bytes, a truncated zip, a bad safetensors header ...
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or another format); {resave}") from err
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors); {resave}")
    if any(k.startswith("_conv_stem.") for k in state):
        state = remap_efficientnet_pytorch_keys(state)
    return state


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: object) -> None:
    """``load_state_dict(strict=True)`` with errors that say what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
            if keys
        ]
        raise ValueError(
            f"weights from {source} do not fit {type(model).__name__}: {'; '.join(problems)}; "
            "check that the checkpoint was saved from this architecture"
        )
    model.load_state_dict(state_dict, strict=True)
