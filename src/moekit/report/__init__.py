"""HTML reports: Jinja2 templates (package data), the page shell and the shared plots."""
