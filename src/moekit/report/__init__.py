"""HTML reports: Jinja2 templates (package data), the page shell and the shared plots.

- `page`: `render` fills a template of templates/ (autoescaped; every page extends
  base.html.j2, which holds the shared CSS) and `png_data_uri` embeds a PNG, so that each page
  is one self-contained file that needs no network.
- `plots`: the figures more than one report draws (loss curves, expert load, validation
  curves), written as PNG files.

This package renders; it computes nothing. The training report (`moekit.training.report`) and
the routing analysis (`moekit.analysis.report`) gather their numbers and render through it.
"""
