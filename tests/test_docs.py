"""The API documentation site (mkdocs.yml, docs/) builds in strict mode and
renders the docstrings of every public name."""

import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import varjax
from varjax import quantization

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build the site once; map each HTML page's path to its text."""
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    return {
        str(path.relative_to(site_dir)): path.read_text(encoding="utf-8")
        for path in site_dir.rglob("*.html")
    }


def _text(page: str) -> str:
    """A page's text without tags (code blocks are split into highlighted spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def _anchors(site: dict[str, str]) -> set[str]:
    return {m for text in site.values() for m in re.findall(r'id="(varjax\.[\w.]+)"', text)}


def _public_objects(module, prefix: str) -> list[tuple[str, object]]:
    return [
        (f"{prefix}.{name}", getattr(module, name))
        for name in module.__all__
        if not inspect.ismodule(getattr(module, name))
    ]


def test_every_family_has_a_page(site):
    for page in [
        "index.html",
        "variance_reduction/index.html",
        "rectification/index.html",
        "multi_ema/index.html",
        "quantization/index.html",
        "precision/index.html",
        "noise/index.html",
        "weight_rescaling/index.html",
        "diagnostics/index.html",
    ]:
        assert page in site


def test_pages_render_the_docstrings(site):
    pages = "\n".join(site.values())
    # MARS: the summary, and the `{args}` template that varjax/alias.py fills at import.
    assert "the variance-reduced gradient fed to AdamW" in pages
    assert "take plain AdamW with" in site["variance_reduction/index.html"]
    assert "bitsandbytes" in site["quantization/index.html"]
    assert "about 2.04 bytes per parameter" in site["quantization/index.html"]  # `{doc}`
    assert "AdEMAMix" in site["multi_ema/index.html"]
    assert "Rectified Adam (Liu et al., 2020)" in site["rectification/index.html"]
    for leftover in ["{args}", "{doc}", ":func:`", ":class:`"]:
        assert leftover not in pages, leftover
    # Examples render as code, and Sphinx roles as links to the objects they name.
    assert ">>> tx = varjax.mars_adamw(3e-3)" in _text(site["variance_reduction/index.html"])
    assert 'href="#varjax.scale_by_mars"' in site["variance_reduction/index.html"]


@pytest.mark.parametrize(
    ("module", "prefix"), [(varjax, "varjax"), (quantization, "varjax.quantization")]
)
def test_every_public_name_is_documented(site, module, prefix):
    anchors = _anchors(site)
    missing = []
    for path, obj in _public_objects(module, prefix):
        canonical = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        if not {path, canonical, f"varjax.{path.rsplit('.', 1)[-1]}"} & anchors:
            missing.append(path)
    assert not missing, f"no entry in docs/*.md (`::: name`) for {missing}"
