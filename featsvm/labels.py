"""Canonical class labels and the folder names that map onto them."""

from __future__ import annotations

import re
from collections.abc import Sequence

from featsvm.errors import UsageError

BENIGN = "benign"
LABELS: tuple[str, ...] = ("benign", "early_pre_b", "pre_b", "pro_b")
MALIGNANT: frozenset[str] = frozenset({"early_pre_b", "pre_b", "pro_b"})
DISPLAY_NAMES: dict[str, str] = {
    "benign": "Benign (hematogone)",
    "early_pre_b": "Early Pre-B",
    "pre_b": "Pre-B",
    "pro_b": "Pro-B",
}

# Folder names seen in the public releases (and obvious variants), normalised by
# `normalise_name`: lower case, letters and digits only.
_ALIASES: dict[str, str] = {
    "benign": "benign",
    "hematogone": "benign",
    "hematogones": "benign",
    "early": "early_pre_b",
    "earlypreb": "early_pre_b",
    "malignantearlypreb": "early_pre_b",
    "pre": "pre_b",
    "preb": "pre_b",
    "malignantpreb": "pre_b",
    "pro": "pro_b",
    "prob": "pro_b",
    "malignantprob": "pro_b",
}


def normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def label_for_folder(name: str, class_map: dict[str, str] | None = None) -> str | None:
    """Canonical label for a class folder name, or None when it is not a known class.

    `class_map` (folder name -> canonical label) wins over the built-in aliases.
    """
    if class_map:
        for folder, label in class_map.items():
            if folder == name or normalise_name(folder) == normalise_name(name):
                return check_label(label)
    return _ALIASES.get(normalise_name(name))


def check_label(label: str) -> str:
    if label not in LABELS:
        raise UsageError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    return label


def is_malignant(label: str) -> bool:
    return label in MALIGNANT


def predicted_label(proba: Sequence[float]) -> str:
    """The class with the highest probability (`proba` in LABELS order; first on ties)."""
    return LABELS[max(range(len(LABELS)), key=lambda i: proba[i])]


def malignant_probability(proba: Sequence[float]) -> float:
    """P(malignant) = the sum of the three B-ALL subtype probabilities."""
    return float(sum(proba[LABELS.index(m)] for m in MALIGNANT))
