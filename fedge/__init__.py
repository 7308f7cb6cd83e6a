"""fedge command line (the `fedge` console script)."""
