"""The report's HTML page: a list of `Section`s rendered through one Jinja2 template with
autoescaping (``templates/report.html.j2``), images embedded as base64 so the page is a single
self-contained file.

A section is a title, an optional partial template (``templates/sections/<name>``) rendered
with the section's ``data`` mapping as ``data``, and figures shown after it. To add a section
to the report, write a function that returns a `Section` and a small partial, and list the
function in `featsvm.evaluation.sections.SECTIONS`; the page template does not change.
Everything a partial prints is escaped unless it is explicitly `markupsafe.Markup`.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE_TEMPLATE = "report.html.j2"


@dataclass(frozen=True)
class Figure:
    """A PNG embedded in the page, optionally under its own ``<h3>`` (with a smaller aside)."""

    path: Path
    alt: str
    heading: str = ""
    aside: str = ""


@dataclass(frozen=True)
class Section:
    """One block of the page. ``title`` "" = no ``<h2>`` (the page's introduction);
    ``partial`` None = figures only."""

    title: str
    partial: str | None = None  # file name under templates/sections/
    data: Mapping[str, Any] = field(default_factory=dict)
    figures: Sequence[Figure] = ()


def _data_uri_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@functools.cache
def environment() -> Any:
    """The Jinja2 environment: package templates, HTML autoescaping, undefined names fail."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("featsvm.evaluation", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["png_data_uri"] = _data_uri_png
    return env


def render_page(title: str, heading: str, sections: Sequence[Section]) -> str:
    """The whole page; the same sections (and figure files) always give the same text."""
    return environment().get_template(PAGE_TEMPLATE).render(
        title=title, heading=heading, sections=list(sections))
