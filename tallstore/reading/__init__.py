"""Reading archives: the opened source, loads, the base, merged models, verify, stats, summaries."""
