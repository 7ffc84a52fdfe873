"""The lorafarm command line and its terminal display."""
