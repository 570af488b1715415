"""A packaged bundle on the device: its manifest, hash verification, labels and preprocessing.

A bundle is a folder (or its ``.tar.gz``) made by ``edgetl package``: the model, ``labels.txt``,
``manifest.json`` with every file's sha256, this runtime and ``requirements-device.txt``. Nothing is
loaded from a bundle whose files do not match its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .modelfile import ModelFileError, check_tflite
from .preprocess import PreprocessSpec

MANIFEST = "manifest.json"
BUNDLE_SCHEMA_VERSION = 1


class BundleError(Exception):
    """The bundle is missing, incomplete, tampered with or inconsistent."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_bundle_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path} is not an edgetl bundle manifest")
    if manifest.get("schema_version") != BUNDLE_SCHEMA_VERSION or manifest.get("kind") != "edgetl-bundle":
        raise BundleError(f"{path} is not an edgetl bundle manifest of schema {BUNDLE_SCHEMA_VERSION}")
    return manifest


def verify_bundle(root: str | os.PathLike) -> list[str]:
    """Problems found re-hashing every file against the manifest (empty: the bundle is intact)."""
    root = Path(root)
    manifest = read_bundle_manifest(root)
    problems = []
    listed = manifest.get("files", {})
    for rel, entry in sorted(listed.items()):
        path = root / rel
        if not isinstance(entry, dict) or not {"size", "sha256"} <= set(entry):
            problems.append(f"{rel}: the manifest has no size and sha256 for it")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in listed and "__pycache__" not in rel:
            problems.append(f"{rel}: not in the manifest")
    return problems or consistency_problems(root, manifest)


def consistency_problems(root: Path, manifest: dict[str, Any]) -> list[str]:
    """What a re-hashed manifest cannot hide: the model must be a whole TFLite file, and labels.txt,
    the manifest and the model's output must name the same number of classes."""
    problems = []
    try:
        labels = read_labels(root / "labels.txt")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"labels.txt: unreadable ({exc})"]
    classes = manifest.get("num_classes")
    if len(labels) != classes:
        problems.append(f"labels.txt: {len(labels)} labels, but the manifest says {classes} classes")
    for rel in {manifest.get("model"), (manifest.get("accelerator") or {}).get("model")} - {None}:
        if not str(rel).endswith(".tflite") or not (root / rel).is_file():
            continue
        try:
            shapes = check_tflite(root / rel)
        except ModelFileError as exc:
            problems.append(f"{rel}: {exc}")
            continue
        outputs = [shape[-1] for shape in shapes.outputs if shape]
        if outputs and outputs[0] != len(labels):
            problems.append(f"{rel}: the model has {outputs[0]} outputs, labels.txt {len(labels)} labels")
    return problems


def read_labels(path: Path) -> list[str]:
    """labels.txt: one class name per line (edgetl refuses class names with control characters)."""
    return path.read_text(encoding="utf-8").splitlines()


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    model_path: Path
    labels: list[str]
    preprocess: PreprocessSpec
    threads: int
    delegate: str | None = None  # "edgetpu": the model is compiled for the Coral Edge TPU

    @property
    def target(self) -> dict[str, Any]:
        return self.manifest["target"]

    def warnings(self) -> list[str]:
        """What the packager overrode: a model shipped despite failing parity, or on weaker parity
        evidence than the target requires (``edgetl package --force`` / ``--accept-weak-parity``)."""
        found = []
        if self.manifest.get("forced"):
            found.append("this model FAILED the parity check and was packaged with --force")
        on_target = self.manifest.get("on_target") or {}
        if on_target.get("passed") is False:
            found.append(f"this model FAILED parity on {on_target.get('described')} (where the target runs it) "
                         "and was packaged with --force")  # fmt: skip
        parity = self.manifest.get("parity") or {}
        for failure in parity.get("failed_verdicts") or []:
            found.append(f"this model FAILED parity on {failure} and was packaged with --force")
        waived = parity.get("evidence_waived")
        if waived:
            found.append(f"this model's parity evidence is weaker than its target requires ({waived}); "
                         "it was packaged with --accept-weak-parity")  # fmt: skip
        return found


def open_bundle(root: str | os.PathLike, verify: bool = True) -> Bundle:
    """Open a bundle folder, refusing it if any file differs from its manifest.

    Raises:
        BundleError: not a bundle, tampered, or labels that do not match the model.
    """
    root = Path(root)
    manifest = read_bundle_manifest(root)
    if verify:
        problems = verify_bundle(root)
        if problems:
            raise BundleError(f"bundle {root} fails verification: {problems[0]}"
                              + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))  # fmt: skip
    labels = read_labels(root / "labels.txt")
    if len(labels) != manifest["num_classes"]:
        raise BundleError(f"labels.txt has {len(labels)} labels, the model {manifest['num_classes']} classes")
    accelerator = manifest.get("accelerator") or {}
    compiled = accelerator.get("compiled") and accelerator.get("tool") == "edgetpu_compiler"
    return Bundle(
        root=root,
        manifest=manifest,
        model_path=root / (accelerator["model"] if compiled else manifest["model"]),
        delegate="edgetpu" if compiled else None,
        labels=labels,
        preprocess=PreprocessSpec.from_dict(manifest["preprocess"]),
        threads=int(manifest["target"].get("threads", 1)),
    )
