"""Views of a Report: rich tables, Markdown, JSON. Renderers never touch torch."""
