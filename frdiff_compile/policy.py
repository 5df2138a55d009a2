"""Keyframe policies: a learned keyframe mask saved as JSON, with what it was tuned on.

Invariants:
- JSON only (never pickle): format version, number of steps, the mask, the settings that produced it, the
  loss history, and a fingerprint of the UNet config it was tuned on.
- Loading validates everything and raises `ValueError` saying what is wrong with which file; a policy is
  applied only to a UNet with the same config fingerprint (checked by `optimize`) and only to generations
  with its number of steps (checked by the schedule at each generation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

POLICY_FORMAT_VERSION = 1


def unet_fingerprint(unet: Any) -> str:
    """A short hash of the UNet's config (architecture and training settings), not of its weights."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_policy_fingerprint(unet: Any, expected: str | None) -> None:
    """Refuse a config whose keyframe policy was tuned on another UNet architecture (None: no policy)."""
    if expected is None:
        return
    found = unet_fingerprint(unet)
    if found != expected:
        raise ValueError(
            f"the keyframe policy was tuned on a UNet with config fingerprint {expected}, this UNet's is {found}; "
            "tune a policy for this model (frdiff-compile tune) or use keyframe_interval"
        )


@dataclasses.dataclass(frozen=True)
class KeyframePolicy:
    num_steps: int
    keyframes: tuple[bool, ...]
    unet_fingerprint: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss_history: tuple[float, ...] = ()
    format_version: int = POLICY_FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.keyframes) != self.num_steps:
            raise ValueError(f"policy has {len(self.keyframes)} keyframe entries for num_steps={self.num_steps}")
        if not self.keyframes or not self.keyframes[0]:
            raise ValueError("policy keyframes must start with True (step 0 always computes)")

    @property
    def num_keyframes(self) -> int:
        return sum(self.keyframes)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["keyframes"] = [int(k) for k in self.keyframes]
        data["loss_history"] = [round(float(x), 8) for x in self.loss_history]
        return json.dumps(data, indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> KeyframePolicy:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"policy file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"policy file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"policy file {path} must hold a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if version != POLICY_FORMAT_VERSION:
            raise ValueError(f"policy file {path} has format_version {version!r}; this release reads {POLICY_FORMAT_VERSION}")
        missing = sorted({"num_steps", "keyframes", "unet_fingerprint"} - set(data))
        if missing:
            raise ValueError(f"policy file {path} lacks {missing}")
        keyframes = data["keyframes"]
        if not isinstance(keyframes, list) or not all(k in (0, 1, True, False) for k in keyframes):
            raise ValueError(f"policy file {path}: keyframes must be a list of 0/1 values")
        try:
            return cls(
                num_steps=int(data["num_steps"]),
                keyframes=tuple(bool(k) for k in keyframes),
                unet_fingerprint=str(data["unet_fingerprint"]),
                settings=dict(data.get("settings", {})),
                loss_history=tuple(float(x) for x in data.get("loss_history", ())),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"policy file {path} is malformed: {exc}") from None
