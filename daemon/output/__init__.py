"""Files out: PNG/MP4 with metadata, post-processing results, sweep grids, the morning report."""
