"""Reports from evaluated folders: comparison.csv/.md, PNG plots and report.html (no model)."""
