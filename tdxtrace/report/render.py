"""Lay a :class:`~tdxtrace.report.model.ReportModel` out as one self-contained HTML page.

There is one jinja2 environment, built once: autoescape on for every template (data from traces
and plugins is never marked safe), StrictUndefined (a misspelled name in a template is an error,
not an empty string), templates and the stylesheet shipped inside the package and inlined.

An analyzer may ship its own section template (``Analyzer.template``, a path relative to the
folder of its module). It is rendered with ``section`` (a :class:`~tdxtrace.report.model.
Section`) and may import the report's macros (``{% import "macros.html" as m %}``). If it fails,
the section falls back to the generic layout with the error shown, and is marked fail.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import jinja2
from markupsafe import Markup

from tdxtrace.report import thresholds as th
from tdxtrace.report.formatting import truncate_text
from tdxtrace.report.model import ReportModel, Section, event_summary

_PLUGIN_PREFIX = "plugin:"  # template names for analyzer-shipped templates: plugin:<abs path>


class _PluginTemplateLoader(jinja2.BaseLoader):
    """Loads ``plugin:/abs/path.html`` names: analyzer templates live beside their modules."""

    def get_source(self, environment: jinja2.Environment,
                   template: str) -> tuple[str, str, Callable[[], bool]]:
        if not template.startswith(_PLUGIN_PREFIX):
            raise jinja2.TemplateNotFound(template)
        path = Path(template[len(_PLUGIN_PREFIX):])
        try:
            source = path.read_text(encoding="utf-8")
            mtime = path.stat().st_mtime_ns
        except OSError:
            raise jinja2.TemplateNotFound(template) from None

        def uptodate() -> bool:  # a template edited between two reports is reloaded
            try:
                return path.stat().st_mtime_ns == mtime
            except OSError:
                return False

        return source, str(path), uptodate


@functools.cache
def environment() -> jinja2.Environment:
    """The one jinja2 environment of the report (built on first use)."""
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([
            jinja2.PackageLoader("tdxtrace.report", "templates"),
            _PluginTemplateLoader(),
        ]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals["event_summary"] = event_summary
    return env


@functools.cache
def static_text(name: str) -> Markup:
    """A file shipped in ``tdxtrace/report/static`` (package data, never trace data)."""
    text = (importlib.resources.files("tdxtrace.report") / "static" / name).read_text("utf-8")
    return Markup(text)


@dataclass(frozen=True)
class RenderedReport:
    """The page, and the sections that failed (analyzer errors and template errors)."""

    html: str
    failed: tuple[str, ...]


def _template_error(section: Section, err: Exception) -> str:
    where = section.template_name or "template"
    if isinstance(err, jinja2.TemplateNotFound):
        return f"template {where} not found"
    line = getattr(err, "lineno", None)
    at = f" line {line}" if isinstance(err, jinja2.TemplateSyntaxError) and line else ""
    message = " ".join(str(err).split()) or type(err).__name__
    return truncate_text(f"template {where}{at}: {type(err).__name__}: {message}", 1000)


def render_section(section: Section) -> tuple[Section, Markup]:
    """One section's body, and the section (marked fail if its own template failed)."""
    env = environment()
    if section.error is not None:
        return section, Markup(env.get_template("section_failed.html").render(section=section))
    if section.template is not None:
        try:
            template = env.get_template(_PLUGIN_PREFIX + section.template.as_posix())
            return section, Markup(template.render(section=section))
        except Exception as err:  # a plugin's template is plugin code: contain its failure
            section = replace(section, mark=th.FAIL, template_error=_template_error(section, err))
    return section, Markup(env.get_template("section_generic.html").render(section=section))


def render_model(model: ReportModel) -> RenderedReport:
    """The whole page for ``model``; sections are rendered first so their marks are final."""
    rendered = [render_section(s) for s in model.sections]
    final = replace(model, sections=tuple(s for s, _ in rendered))
    page = environment().get_template("report.html").render(
        report=final,
        run=final.run,
        bodies={s.anchor: body for s, body in rendered},
        css=static_text("report.css"),
        marks=(th.OK, th.WARN, th.FAIL),
    )
    failed = tuple(s.name for s in final.sections
                   if s.error is not None or s.template_error is not None)
    return RenderedReport(page, failed)
