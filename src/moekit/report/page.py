"""Render report pages: the Jinja2 templates shipped in moekit/report/templates/, autoescaped,
with images embedded as data: URIs so that a page is one self-contained file.

Every page template extends base.html.j2 (the page shell: title, shared CSS, body) and may
import macros.html.j2 (`image` for an embedded PNG, `td` for a table cell that right-aligns
numbers). Templates get these filters:

  thousands   12345 -> "12,345"
  fixed(d)    a float with d decimals (default 3), None -> "n/a"
  pct(d)      a fraction as a percentage with d decimals (default 0): 0.25 -> "25%"

and the test `numeric` (text that starts with a digit or a minus sign). jinja2 is imported
only when a page is rendered.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

TEMPLATES = Path(__file__).parent / "templates"


def render(template: str, **context: Any) -> str:
    """The page the template `template` (a file name in moekit/report/templates/) makes of
    `context`. Every value is HTML-escaped where it is written; a name the template uses but
    `context` lacks is an error (jinja2.UndefinedError), not an empty string."""
    return _environment().get_template(template).render(**context)


def png_data_uri(path: Path) -> str | None:
    """The PNG file `path` as a data: URI for an <img src>; None when there is no such file."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def template_names() -> list[str]:
    """The page templates (not the shell, the macros or the CSS they include)."""
    shared = {"base.html.j2", "macros.html.j2"}
    return sorted(p.name for p in TEMPLATES.glob("*.html.j2") if p.name not in shared)


def thousands(n: int | float) -> str:
    """12345 -> "12,345"."""
    return f"{n:,}"


def fixed(x: float | None, digits: int = 3) -> str:
    """`x` with `digits` decimals, or "n/a" for None."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def pct(x: float, digits: int = 0) -> str:
    """A fraction as a percentage: 0.25 -> "25%"."""
    return f"{100 * x:.{digits}f}%"


def numeric(text: object) -> bool:
    """Whether a table cell holds a number (starts with a digit or a minus sign): such cells
    are right-aligned."""
    first = str(text)[:1]
    return first.isdigit() or first == "-"


@functools.cache
def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        # Every template writes HTML: escape every value, whatever the file name says.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(thousands=thousands, fixed=fixed, pct=pct)
    env.tests["numeric"] = numeric
    return env
