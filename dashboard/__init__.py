"""The operators' console in the browser: `pgdispatch dashboard`, or an aiohttp application
to mount in your own (`make_app(DashboardConfig(...))`).

Server-rendered (Jinja2 on aiohttp), readable with JavaScript off; htmx (vendored, pinned) only
refreshes the overview and submits forms in place. Every page reads through the console's own
database role (the reader's views, masked) and every action is an audited SQL function that the
CLI calls too. Layout: config (settings), database (one transaction per request, the console
user set in it), auth (accounts, sessions, CSRF, roles), views (the pages), render (templates
and the formatting they use), charts (SVG from the per-minute counts).
"""

from pgdispatch.dashboard.app import make_app
from pgdispatch.dashboard.config import DashboardConfig

__all__ = ["DashboardConfig", "make_app"]
