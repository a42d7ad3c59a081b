"""The static feature browser (`epbench browse`): card data (cards.py), site writer (site.py), page (static/)."""

from bench.browser.site import BrowseConfig, browse, site_size

__all__ = ["BrowseConfig", "browse", "site_size"]
