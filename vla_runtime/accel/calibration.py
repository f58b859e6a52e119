"""Calibration artifacts: what a method measured on calibration observations, saved as json next to
the checkpoint so that applying the method later needs no calibration data."""

from __future__ import annotations

import json
from pathlib import Path


def save_artifact(path: str | Path, artifact: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(artifact, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_artifact(path: str | Path, method: str) -> dict:
    path = Path(path)
    try:
        artifact = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"No calibration artifact at {path}; run the {method} calibration first") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"Calibration artifact {path} is not valid JSON: {exc}") from exc
    if artifact.get("method") != method:
        raise ValueError(f"{path} is a calibration artifact for '{artifact.get('method')}', not '{method}'")
    return artifact
