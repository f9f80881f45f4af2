"""Studies: error proxies, sweeps, truncation analysis."""
