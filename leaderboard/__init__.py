"""The static leaderboard: `build_site(results_dirs, out)` writes a self-contained HTML site.

Templates live in `leaderboard/templates/` (package data) and are rendered by jinja2 with
autoescaping on; see `leaderboard.build`.
"""

from leaderboard.build import build_site

__all__ = ["build_site"]
