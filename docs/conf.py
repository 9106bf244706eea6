"""Sphinx configuration of the bptt_jax documentation site.

Build it (from the repository root, after ``pip install -e ".[docs]"``)::

    sphinx-build -W -b html docs docs/_build/html

Guides are MyST Markdown; tutorials are MyST-NB notebooks executed at build time (cached
between local builds in ``docs/_build/.jupyter_cache``); the API reference is generated from
the docstrings. With ``-W`` a broken cross-reference to a ``bptt_jax`` name, a public name
missing from the API reference, or a failing notebook cell fails the build.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bptt_jax  # noqa: E402

project = "bptt_jax"
author = "the bptt_jax authors"
copyright = "2026, the bptt_jax authors"
release = version = bptt_jax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]
exclude_patterns = ["_build", "README.md", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}

# -- MyST and MyST-NB ---------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("BPTT_JAX_DOCS_EXECUTE", "cache")
nb_execution_cache_path = str(Path(__file__).parent / "_build" / ".jupyter_cache")
nb_execution_timeout = 600
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True

# -- API reference ------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
# Only references to bptt_jax's own names are checked: a missing one is an error under -W;
# annotations naming jax, numpy, optax or the standard library are not looked up.
nitpicky = True
# Internals (``bptt_jax._engine``, ``bptt_jax.cli``) are named in docstrings but not documented.
nitpick_ignore_regex = [(r"py:.*", r"(?!bptt_jax\b).*"), (r"py:.*", r"bptt_jax\.(_|cli\b).*")]

# -- HTML ---------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"bptt_jax {version}"
html_static_path = ["_static"]
html_favicon = "_static/favicon.png"
html_context = {"default_mode": "light"}


def _local_mathjax() -> str | None:
    """MathJax 3 served with the site (the ``django-static-mathjax`` package carries its
    files), so that math renders offline; ``None`` (Sphinx's CDN default) without it."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        return None
    es5 = Path(spec.submodule_search_locations[0]) / "static" / "mathjax" / "es5"
    if not (es5 / "tex-mml-chtml.js").is_file():
        return None
    stage = Path(__file__).parent / "_build" / "mathjax_static"
    dest = stage / "mathjax"
    if not (dest / "tex-mml-chtml.js").is_file():
        fonts = Path("output", "chtml", "fonts", "woff-v2")
        shutil.copytree(es5 / fonts, dest / fonts, dirs_exist_ok=True)
        shutil.copy2(es5 / "tex-mml-chtml.js", dest / "tex-mml-chtml.js")
    html_static_path.append(str(stage))
    return "mathjax/tex-mml-chtml.js"


mathjax_path = _local_mathjax() or "https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"
html_theme_options = {
    "repository_url": "https://github.com/bptt-jax/bptt_jax",
    "use_repository_button": False,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}


# -- Every public name in the reference, every reference to a re-export resolved ---------
def _public_names() -> list[str]:
    return [f"bptt_jax.{n}" for n in bptt_jax.__all__ if n != "__version__"]


def _documented(env) -> dict[int, str]:
    """``{id(object): documented name}`` of every Python object the site documents."""
    out = {}
    for name, entry in env.get_domain("py").objects.items():
        if entry.objtype == "module" or not name.startswith("bptt_jax"):
            continue
        obj = _lookup(name)
        if obj is not None and id(obj) not in out:
            out[id(obj)] = name
    return out


def _lookup(name: str):
    """The object a dotted ``bptt_jax`` name refers to, or ``None``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _check_api_complete(app, env):
    documented = set(env.get_domain("py").objects)
    missing = [n for n in _public_names() if n not in documented]
    for name in missing:
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            f"public name {name} (bptt_jax.__all__) has no entry in the API reference (docs/api/)"
        )


_DOCUMENTED: dict = {}  # the map of _documented, made once per build when first needed


def _resolve_reexport(app, env, node, contnode):
    """A reference to ``bptt_jax.cells.LSTM`` or, inside a module's docstring, to a name
    the module imports, resolves to where that object is documented (``bptt_jax.LSTM``)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    candidates = [target]
    module = node.get("py:module")
    if module and not target.startswith("bptt_jax"):
        candidates.append(f"{module}.{target}")
        cls = node.get("py:class")
        if cls:
            candidates.append(f"{module}.{cls}.{target}")
    if not target.startswith("bptt_jax"):
        candidates.append(f"bptt_jax.{target}")
    if _DOCUMENTED.get("env") is not env:
        _DOCUMENTED.update(env=env, map=_documented(env))
    documented = _DOCUMENTED["map"]
    py = env.get_domain("py")
    for name in candidates:
        obj = _lookup(name)
        if obj is None or (inspect.ismodule(obj) and name not in py.modules):
            continue
        canonical = name if inspect.ismodule(obj) else documented.get(id(obj))
        if canonical is None:
            continue
        new = node.copy()
        new["reftarget"] = canonical
        ref = py.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], canonical, new, contnode
        )
        if ref is not None:
            return ref
    return None


_NAMES = re.compile(r"^(\s+)[a-z_0-9]+(, [a-z_0-9]+)*,$")


def _join_argument_lists(app, what, name, obj, options, lines):
    """An ``Args:`` entry naming several arguments over two lines (``model, params, ...,`` /
    ``    truncate, delta_clip: as in ...``) becomes one line, as napoleon needs it."""
    i = 0
    while i < len(lines) - 1:
        m = _NAMES.match(lines[i])
        nxt = lines[i + 1]
        if m and nxt.startswith(m.group(1) + " ") and ":" in nxt:
            lines[i : i + 2] = [lines[i] + " " + nxt.strip()]
            continue
        i += 1


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    doc = getattr(obj, "__doc__", None) or ""
    if doc.startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("env-check-consistency", _check_api_complete)
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-process-docstring", _join_argument_lists, priority=400)
