"""The report's parts, one job each: claims (claim records from the typed results), figures, provenance and
the plain tables (stage status, timings, deviations). `stages/report.py` is the thin stage module over them."""
